"""pipeline.data.storage and pipeline.data.cache against a real S3 API (moto's server on 127.0.0.1)."""
import json
import multiprocessing
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig
from pipeline.data import cache, storage
from tests.s3server import clean_aws_env


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The server, this process configured for it through a `storage:` block, a fresh bucket and cache."""
    clean_aws_env(monkeypatch)
    monkeypatch.setenv("OFFRAMP_CACHE_DIR", str(tmp_path / "cache"))
    storage.configure(StorageConfig.model_validate(s3_server.storage()))
    s3_server.url = s3_server.bucket(f"b-{uuid.uuid4().hex[:8]}")
    yield s3_server
    storage.configure(None)


def test_write_atomic_and_read_back_through_the_storage_block(s3):
    url = f"{s3.url}/dir/x.json"
    storage.write_atomic(url, json.dumps({"a": 1}))
    fs, path = storage.filesystem(url)
    assert json.loads(fs.cat(path)) == {"a": 1}
    assert s3.fs().ls(f"{s3.url}/dir") == [path]  # the temporary key is gone


def test_a_failed_write_leaves_nothing_under_the_final_name(s3):
    url = f"{s3.url}/out/part-000000-000000.parquet"

    def half(f):
        f.write(b"PAR1 half a part")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        storage.write_atomic(url, half)
    assert s3.fs().find(f"{s3.url}/out") == []


def test_missing_bucket_no_credentials_and_unknown_scheme_name_the_url_and_fix(s3, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist.*create it"):
        storage.check_readable("s3://no-such-bucket/in/*.parquet")
    with pytest.raises(storage.StorageError, match=r"output 's3://no-such-bucket/out'.*does not exist"):
        storage.check_writable("s3://no-such-bucket/out")
    assert not s3.fs().exists("no-such-bucket")  # checking never creates a bucket
    storage.configure(StorageConfig.model_validate({"s3": {"endpoint_url": s3.endpoint}}))
    with pytest.raises(storage.StorageError, match=r"no credentials.*AWS_ACCESS_KEY_ID"):
        storage.check_readable(f"{s3.url}/x")
    with pytest.raises(storage.StorageError, match=r"unknown URL scheme 'nosuch'"):
        storage.filesystem("nosuch://x/y")
    with pytest.raises(storage.StorageError, match=r"az:// URLs need a package.*pip install 'offramp\[storage\]'"):
        storage.filesystem("az://container/x")


def test_unreachable_endpoint_names_it(s3):
    storage.configure(StorageConfig.model_validate(
        {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"},
         "options": {"s3": {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}}}))
    with pytest.raises(storage.StorageError, match=r"cannot reach the storage endpoint http://127.0.0.1:9"):
        storage.check_readable("s3://any-bucket/x")


def test_options_by_url_prefix_win_over_the_scheme_settings():
    cfg = StorageConfig.model_validate({"s3": {"endpoint_url": "http://a:1"},
                                        "options": {"s3": {"anon": False}, "s3://other": {"endpoint_url": "http://b:2"}}})
    assert storage.storage_options("s3://mine/x", cfg) == {"endpoint_url": "http://a:1", "anon": False}
    assert storage.storage_options("s3://other/x", cfg)["endpoint_url"] == "http://b:2"
    assert storage.storage_options("/local/path", cfg) == {}


def test_settings_reach_another_process_through_the_environment(s3, monkeypatch):
    env = storage.ray_env_vars()
    assert set(env) == {storage.ENV}
    code = ("from pipeline.data import storage; import json; "
            f"fs, p = storage.filesystem({s3.url + '/e.txt'!r}); storage.write_atomic({s3.url + '/e.txt'!r}, 'hi'); "
            "print(json.dumps(storage.settings().s3.endpoint_url))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == s3.endpoint
    assert s3.fs().cat(f"{s3.url}/e.txt") == b"hi"


def _upload_dir(s3, files: dict[str, bytes]) -> str:
    url = f"{s3.url}/art-{uuid.uuid4().hex[:6]}"
    for rel, data in files.items():
        storage.write_atomic(f"{url}/{rel}", data)
    return url


def test_cache_fetches_once_verifies_and_refetches_a_damaged_copy(s3):
    url = _upload_dir(s3, {"manifest.json": b"{}", "model/weights.bin": os.urandom(50_000)})
    first = cache.local_copy(url)
    assert first.parent == cache.cache_root()
    assert (first / "model" / "weights.bin").read_bytes() == s3.fs().cat(f"{url}/model/weights.bin")
    inode = first.stat().st_ino
    assert cache.local_copy(url).stat().st_ino == inode  # used as it is, not fetched again
    (first / "model" / "weights.bin").write_bytes(b"damaged")  # a disk error, a stray edit
    again = cache.local_copy(url)
    assert (again / "model" / "weights.bin").read_bytes() == s3.fs().cat(f"{url}/model/weights.bin")
    # the same content at another URL is the same cache entry; changed content is a new one
    twin = _upload_dir(s3, {"manifest.json": b"{}", "model/weights.bin": (again / "model/weights.bin").read_bytes()})
    assert cache.local_copy(twin) == again
    storage.write_atomic(f"{url}/manifest.json", b'{"v": 2}')
    assert cache.local_copy(url) != again


def test_a_half_written_cache_is_never_used(s3):
    url = _upload_dir(s3, {"a.bin": b"x" * 1000})
    path = cache.local_copy(url)
    key = path.name
    # what a fetch killed midway leaves: a temporary directory, and no finished copy
    import shutil

    shutil.rmtree(path)
    half = cache.cache_root() / f".tmp-{key}-999999-deadbeef"
    half.mkdir()
    (half / "a.bin").write_bytes(b"x" * 10)
    again = cache.local_copy(url)
    assert (again / "a.bin").read_bytes() == b"x" * 1000
    assert not half.exists()


def _fetch_in_process(args):
    url, settings_json, cache_dir, barrier = args
    os.environ["OFFRAMP_CACHE_DIR"] = cache_dir
    os.environ[storage.ENV] = settings_json
    barrier.wait()  # every process asks at the same moment
    path = cache.local_copy(url)
    return str(path), path.stat().st_ino


def test_concurrent_processes_on_one_node_fetch_once(s3, tmp_path):
    url = _upload_dir(s3, {"manifest.json": b"{}", "w.bin": os.urandom(2_000_000)})
    n = 4
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as m:
        barrier = m.Barrier(n)
        with ctx.Pool(n) as pool:
            got = pool.map(_fetch_in_process, [(url, storage.settings().model_dump_json(), str(tmp_path / "cache"),
                                                barrier)] * n)
    assert len(set(got)) == 1  # one directory, one inode: nobody replaced another's copy
    entries = os.listdir(tmp_path / "cache" / "artifacts")
    assert sorted(e for e in entries if not e.endswith(".lock")) == [os.path.basename(got[0][0])]


def test_readers_and_upload_dir_go_through_the_storage_settings(s3, tmp_path):
    from pipeline.data.readers import read_table

    fs = s3.fs()
    for i in range(2):
        with fs.open(f"{s3.url}/corpus/f{i}.parquet", "wb") as f:
            pq.write_table(pa.table({"text": [f"t{i}a", f"t{i}b"]}), f)
    assert read_table(f"{s3.url}/corpus/*.parquet").column("text").to_pylist() == ["t0a", "t0b", "t1a", "t1b"]
    assert read_table(f"{s3.url}/corpus").num_rows == 4
    local = tmp_path / "art"
    (local / "model").mkdir(parents=True)
    (local / "model" / "w.bin").write_bytes(b"w")
    (local / "manifest.json").write_text("{}")
    storage.upload_dir(local, f"{s3.url}/up")
    assert sorted(fs.find(f"{s3.url}/up")) == [f"{s3.url[5:]}/up/manifest.json", f"{s3.url[5:]}/up/model/w.bin"]


def test_an_artifact_at_a_url_reads_loads_and_tokenizes_as_the_local_one(s3, tiny_artifact):
    from pipeline.engine.encoder import TextEncoder
    from pipeline.engine.loader import load_artifact
    from pipeline.model.artifact import read_manifest

    url = f"{s3.url}/models/tiny-ee"
    storage.upload_dir(tiny_artifact, url)
    assert read_manifest(url) == read_manifest(tiny_artifact)  # read in place: nothing fetched yet
    assert not cache.cache_root().exists()
    model, _, manifest = load_artifact(url)
    local, _, _ = load_artifact(tiny_artifact)
    assert manifest == read_manifest(tiny_artifact)
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(local.state_dict().items())):
        assert (a == b).all(), k
    enc = TextEncoder.from_artifact(url).encode(["a fine film"])
    assert enc.input_ids == TextEncoder.from_artifact(tiny_artifact).encode(["a fine film"]).input_ids
    with pytest.raises(FileNotFoundError, match="not an early-exit artifact"):
        read_manifest(f"{s3.url}/models/nothing-here")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        read_manifest("s3://no-such-bucket/models/tiny-ee")


def test_serve_keeps_a_model_url_for_its_replicas_and_makes_paths_absolute():
    from pipeline.serving.app import resolve_config

    assert resolve_config({"model": "s3://models/ee"}).model == "s3://models/ee"
    assert resolve_config({"model": "rel/ee"}).model == os.path.abspath("rel/ee")


def test_a_serve_replica_fetches_a_model_url_with_its_apps_storage_block(s3, tiny_artifact, monkeypatch):
    """No AWS settings in the environment and none configured in this process (the s3 fixture clears both; the
    endpoint is a local moto server no default would find): the app's `storage:` block alone gets the replica
    to the model."""
    from pipeline.serving.config import ServeAppConfig
    from pipeline.serving.replica import ReplicaEngine

    url = f"{s3.url}/models/tiny-ee"
    storage.upload_dir(tiny_artifact, url)
    block = s3.storage()
    storage.configure(None)
    engine = ReplicaEngine(ServeAppConfig(model=url, storage=block, controller={"enabled": False},
                                          engine={"num_threads": 1}))
    assert engine.predictor.manifest.ramp_layers == [1, 2, 3]


def test_an_empty_block_leaves_the_settings_to_the_environment(monkeypatch):
    """A Serve replica or job whose YAML has no `storage:` block keeps what the driver sent (ENV); a block wins."""
    sent = StorageConfig.model_validate({"s3": {"endpoint_url": "http://127.0.0.1:9"}})
    monkeypatch.setenv(storage.ENV, sent.model_dump_json())
    try:
        assert storage.configure(StorageConfig()) == sent
        assert storage.configure({}) == sent
        own = StorageConfig.model_validate({"s3": {"endpoint_url": "http://127.0.0.1:10"}})
        assert storage.configure(own) == own
        monkeypatch.delenv(storage.ENV)
        assert storage.configure(None) == StorageConfig()
    finally:
        storage.configure(None)
