"""A readable summary of an early-exit artifact (reads only manifest.json: no torch, instant)."""
from __future__ import annotations

from pipeline.model.artifact import read_manifest


def inspect_table(path: str) -> str:
    m = read_manifest(path)
    boot = m.bootstrap
    counts = boot.get("validation_exit_counts") or [None] * len(m.ramps)
    val_rows = boot.get("validation_rows") or 0
    p = m.profile
    mean_layer = (sum(p.layer_ms) / len(p.layer_ms)) if p else None
    lines = [
        f"{path}: {m.family}, {m.num_layers} layers x {m.hidden_size}, {m.num_labels} classes {m.label_names}",
        f"profile: {p.device} {p.dtype}, batch {p.batch_rows}x{p.seq_len}" if p else "profile: none",
        "",
        f"{'ramp':>4} {'layer':>5} {'pool':>5} {'val agree':>9} {'threshold':>9} {'exit rate':>9} {'cost ms':>8} {'% layer':>7}",
    ]
    for r, info in enumerate(m.ramps):
        thr = m.thresholds[r]
        state = f"{thr:.3f}" if m.active[r] and thr < 1.0 else ("closed" if m.active[r] else "off")
        rate = f"{counts[r] / val_rows:.1%}" if counts[r] is not None and val_rows else "-"
        cost = f"{p.ramp_ms[r]:.3f}" if p else "-"
        pct = f"{p.ramp_ms[r] / mean_layer:.1%}" if p and mean_layer else "-"
        agree = f"{info.val_agreement:.3f}" if info.val_agreement is not None else "-"
        lines.append(f"{r:>4} {info.layer:>5} {info.pooling:>5} {agree:>9} {state:>9} {rate:>9} {cost:>8} {pct:>7}")
    if "validation_agreement_at_thresholds" in boot:
        lines += [
            "",
            f"validation ({val_rows} rows) at these thresholds: agreement {boot['validation_agreement_at_thresholds']:.4f}"
            f" (constraint {1 - m.constraint:.2f}), layer compute saved {boot['validation_layer_savings_at_thresholds']:.1%},"
            f" latency saved {boot['validation_savings_at_thresholds']:.1%}",
        ]
    lines += _chain(m)
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _check_text(c: dict, against: str) -> str:
    acc = (f", gold accuracy {_pct(c['accuracy'])} vs {_pct(c['source_accuracy'])}"
           if c.get("accuracy") is not None else "")
    return (f"check vs {against}: agreement {_pct(c['agreement'])} on {c['rows']} rows of {c['data']} "
            f"(loss {_pct(c['agreement_loss'])}, budget {_pct(c['budget'])}){acc}")


def _chain(m) -> list[str]:
    """What was done to the float original, in order: a pruning (manifest.pruning), then a compression."""
    steps = []
    if m.pruning:
        p = m.pruning
        w0, w1 = p.get("widths_before", {}), p.get("widths_after", {})
        kinds = [f"ffn {p.get('ffn', 0):.0%} ({w0.get('ffn')} -> {w1.get('ffn')} neurons per layer)"]
        if p.get("heads"):
            kinds.append(f"heads {p['heads']:.0%} ({w0.get('heads')} -> {w1.get('heads')} per layer)")
        imp, rec, r = p.get("importance", {}), p.get("recovery", {}), p.get("ramps") or {}
        steps.append([
            f"pruned ({p.get('method')}, {p.get('library')}): {', '.join(kinds)}; parameters "
            f"{p.get('params_before', 0) / 1e6:.1f}M -> {p.get('params_after', 0) / 1e6:.1f}M",
            f"importance on {imp.get('rows')} rows of {imp.get('data')}; recovery {rec.get('steps', 0)} distillation steps"
            + (f", kept step {rec['kept_step']} (best validation agreement with the original)" if "kept_step" in rec else ""),
            _check_text(p["check"], "the original"),
            (f"ramps {r.get('mode')}; thresholds tuned against the original: early-exit agreement "
             f"{_pct(r.get('check_exit_agreement'))} on {r.get('check_data')}, layer savings "
             f"{_pct(r.get('check_layer_savings'))}") if r else "ramps: -",
        ])
    if m.compression:
        c = m.compression
        cfg = c.get("config") or {}
        chk = c.get("check") or {}
        lines = [f"{c.get('method')} ({', '.join(f'{k} {v}' for k, v in cfg.items())})"]
        if chk:
            lines.append(_check_text(chk, "the pruned float model" if m.pruning else "the float model"))
            if chk.get("original_agreement") is not None:
                lines.append(f"agreement with the original {_pct(chk['original_agreement'])} (the chain's loss)")
        if rt := c.get("retune"):
            lines.append(f"thresholds re-tuned against the original: early-exit agreement "
                         f"{_pct(rt.get('check_exit_agreement'))} on {rt.get('check_data')}, layer savings "
                         f"{_pct(rt.get('check_layer_savings'))}")
        steps.append(lines)
    if not steps:
        return []
    out = ["", f"float original: {m.original or 'this artifact'}"]
    for i, lines in enumerate(steps, 1):
        out.append(f"  {i}. {lines[0]}")
        out += [f"     {x}" for x in lines[1:]]
    return out
