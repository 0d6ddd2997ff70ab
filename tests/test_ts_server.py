"""The server helpers: config copies, Java properties (snapshots), restore targets."""

import json

import pytest

from serving.server import (ROOT, TorchServe, model_names, read_properties, restartable,
                            restored_models, write_config)

pytestmark = pytest.mark.unit


def test_snapshot_properties_are_unescaped(tmp_path):
    snapshot = {"name": "x-shutdown.cfg", "models": {"scenes": {"1.0": {"defaultVersion": True}},
                                                       "digits": {"2.0": {"defaultVersion": True}}}}
    escaped = json.dumps(snapshot, indent=1).replace("\n", "\\n").replace(":", "\\:")
    (tmp_path / "logs" / "config").mkdir(parents=True)
    (tmp_path / "logs" / "config" / "20260101000000000-startup.cfg").write_text("a=1\n")
    (tmp_path / "logs" / "config" / "20260102000000000-shutdown.cfg").write_text(
        "#Saving snapshot\ninference_address=http\\://127.0.0.1\\:8080\n"
        f"model_snapshot={escaped}\nkey\\u0041=v\\=w\n")
    props = read_properties(tmp_path / "logs" / "config" / "20260102000000000-shutdown.cfg")
    assert props["inference_address"] == "http://127.0.0.1:8080"
    assert json.loads(props["model_snapshot"]) == snapshot
    server = TorchServe(workdir=tmp_path, restore=True)
    assert server.last_snapshot().name == "20260102000000000-shutdown.cfg"
    assert restored_models(server.last_snapshot()) == ["scenes", "digits"]


def test_config_copy_overrides_and_absolute_paths(tmp_path):
    dest = write_config(ROOT / "config.properties", tmp_path / "c.properties",
                        {"inference_address": "http://127.0.0.1:1234", "job_queue_size": "7"})
    props = read_properties(dest)
    assert props["inference_address"] == "http://127.0.0.1:1234" and props["job_queue_size"] == "7"
    assert props["metrics_config"] == str(ROOT / "monitoring" / "metrics.yaml")
    assert props["model_store"] == str(ROOT / "model_store")
    assert props["allowed_urls"] == "/.*" and props["enable_model_api"] == "true"


def test_model_names_from_models_arguments():
    assert model_names(["scenes=scenes_v2.mar", "model_store/digits.mar"]) == ["scenes", "digits"]


def test_server_never_rewrites_the_project_config(tmp_path):
    """The server's working directory may be the config's own folder (the repository root for
    make serve): the overridden copy goes under its logs/, the config stays as it was."""
    config = tmp_path / "config.properties"
    config.write_text((ROOT / "config.properties").read_text())
    before = config.read_text()
    server = TorchServe(workdir=tmp_path, config=config, overrides={"job_queue_size": "9"})
    assert server.config_path == tmp_path / "logs" / "ts.config.properties"
    assert read_properties(server.config_path)["job_queue_size"] == "9"
    assert config.read_text() == before
    with pytest.raises(ValueError, match="refusing"):
        write_config(config, config, {})


def test_token_waits_for_a_key_file_being_written(tmp_path):
    """TorchServe creates key_file.json empty, then fills it: a read in between must not fail."""
    import threading

    ts = TorchServe(workdir=tmp_path)
    key_file = tmp_path / "key_file.json"
    key_file.write_text("")
    keys = {"management": {"key": "m-key"}, "inference": {"key": "i-key"}}
    writer = threading.Timer(0.3, lambda: key_file.write_text(json.dumps(keys)))
    writer.start()
    try:
        assert ts.token("inference") == "i-key"
        assert ts.headers("management") == {"Authorization": "Bearer m-key"}
    finally:
        writer.join()


def test_restart_config_unescapes_the_snapshots_vmargs(tmp_path):
    snapshot = tmp_path / "20261121-snapshot.cfg"
    snapshot.write_text(r"vmargs=-XX\:TieredStopAtLevel\=1" "\n"
                        r'model_snapshot={\n"name"\: "startup.cfg"}' "\n"
                        "model_store=/abs/store\n")
    copy = restartable(snapshot, tmp_path / "restore.properties")
    assert copy != snapshot
    lines = copy.read_text().splitlines()
    assert lines[0] == "vmargs=-XX:TieredStopAtLevel=1"  # what the JVM accepts
    assert lines[1:] == snapshot.read_text().splitlines()[1:]  # the frontend unescapes the rest
    snapshot.write_text("model_store=/abs/store\n")
    assert restartable(snapshot, tmp_path / "other.properties") == snapshot


def test_key_file_is_read_one_way_by_every_client(tmp_path):
    """serving.server.read_key: None without a file, a clear error for a missing API entry;
    the management CLI reads the same file (the API key for renew-key)."""
    from serving.server import ServerError, bearer, read_key
    key_file = tmp_path / "key_file.json"
    assert read_key(key_file, "inference") is None and bearer(key_file, "inference") == {}
    key_file.write_text(json.dumps({"inference": {"key": "i"}, "API": {"key": "a"}}))
    assert read_key(key_file, "API") == "a" and bearer(key_file, "inference") == {"Authorization": "Bearer i"}
    with pytest.raises(ServerError, match="no 'management' key"):
        read_key(key_file, "management")


def test_start_refuses_an_archive_missing_from_the_store_before_launching(tmp_path):
    """make serve MODEL=nope: the error names the store and what it holds; nothing is started."""
    from serving.server import ServerError
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "digits.mar").write_bytes(b"")
    ts = TorchServe(workdir=tmp_path / "work", model_store=tmp_path / "store", models=["nope=nope.mar"])
    with pytest.raises(ServerError, match=r"no archive 'nope.mar' in the model store .*it has: digits.mar"):
        ts.start()
    assert ts.proc is None and not (tmp_path / "work" / "torchserve.pid").exists()



def test_restore_refuses_a_snapshot_with_a_name_the_api_cannot_remove(tmp_path):
    """A model registered as ../../x (before the frontend patch refused such names) answered 404
    on every REST path and came back with every --restore; restoring it is refused."""
    from serving.server import ServerError
    snapshot = {"name": "s.cfg", "models": {"../../x": {"1.0": {"defaultVersion": True}},
                                            "scenes": {"1.0": {"defaultVersion": True}}}}
    (tmp_path / "logs" / "config").mkdir(parents=True)
    (tmp_path / "logs" / "config" / "20260102000000000-shutdown.cfg").write_text(
        "model_snapshot=" + json.dumps(snapshot).replace(":", "\\:") + "\n")
    ts = TorchServe(workdir=tmp_path, restore=True)
    with pytest.raises(ServerError, match=r"model names \['../../x'\] are not plain names"):
        ts.start()
    assert ts.proc is None
