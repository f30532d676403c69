"""One progress line for long local work (fine-tune, bootstrap's feature caching, distill, replay's recording)."""
from __future__ import annotations

import time

import click


def progress(label: str):
    """A `(done, total, *extra)` callback that keeps one line on stderr (stdout stays parseable) with the
    rate and the time left; `extra[0]`, when given, is the current loss."""
    start = time.monotonic()

    def show(done: int, total: int, *extra) -> None:
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        loss = f" loss {extra[0]:.3f}" if extra else ""
        click.echo(f"\r{label}: {done}/{total} ({rate:.1f}/s{left}){loss}   ", nl=False, err=True)
        if done >= total:
            click.echo("", err=True)

    return show
