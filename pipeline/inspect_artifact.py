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
    if m.compression:
        lines.append(f"compression: {m.compression}")
    return "\n".join(lines)
