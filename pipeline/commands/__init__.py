"""Click commands that live beside the subsystem they drive; `pipeline.cli` registers them (layer 6: they may
import anything, nothing imports them but the CLI)."""
