"""Config: typed, validated, and every YAML under configs/ loads."""
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import EngineConfig, load_yaml


def test_unknown_keys_and_bad_values_are_errors_that_name_them():
    with pytest.raises(ValidationError, match="shadow_fractoin"):
        EngineConfig(shadow_fractoin=0.1)
    with pytest.raises(ValidationError, match="shadow_fraction"):
        EngineConfig(shadow_fraction=1.5)
    with pytest.raises(ValidationError, match="device='gpu0'"):
        EngineConfig(device="gpu0")
    with pytest.raises(ValidationError, match="max_token_budget"):
        EngineConfig(token_budget=10**6)


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_every_shipped_yaml_parses():
    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"))
    for f in files:
        assert isinstance(load_yaml(f), dict), f


def test_passthrough_cannot_overwrite_prediction_columns():
    from pipeline.config import InputSpec

    with pytest.raises(ValidationError, match="overwrite prediction columns"):
        InputSpec(url="x.parquet", passthrough=["label"])
