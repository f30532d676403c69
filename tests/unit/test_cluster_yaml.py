"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own validator, offline)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["max_workers"] >= 1 and gpu[0]["min_workers"] == 0  # autoscaling GPU workers
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_a_broken_cluster_yaml_is_rejected():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["min_workers"] = "lots"
    with pytest.raises(Exception):
        validate_config(prepare_config(raw))
