"""Model lifecycle against a real TorchServe: versions, scaling, restart, secure registration.

Changes are made while a steady stream of predictions runs (tests/traffic.py) and every
response is counted. The counts are printed (``pytest -s``) for the record.
"""

import shutil
import time
import zipfile

import pytest
import requests

from conftest import build_archive, encode, make_checkpoint, running_server, scene
from scripts import manage
from serving.management import Management, ManagementError
from serving.server import TorchServe
from traffic import Traffic

pytestmark = pytest.mark.e2e
MODEL = "tiny3"
V1_LABELS, V2_LABELS = ["cat", "dog", "bird"], ["cat_v2", "dog_v2", "bird_v2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A model store with v1 (tiny3.mar) and v2 (tiny3_v2.mar, other labels and weights)."""
    root = tmp_path_factory.mktemp("lifecycle")
    store = root / "model_store"
    v1 = make_checkpoint(root / "v1.pt", V1_LABELS, seed=0)
    v2 = make_checkpoint(root / "v2.pt", V2_LABELS, seed=1)
    build_archive(v1, store, MODEL, "--version", "1.0", "--num-threads", "1")
    build_archive(v2, store, MODEL, "--version", "2.0", "--archive-name", f"{MODEL}_v2",
                  "--num-threads", "1")
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory, store):
    with running_server(tmp_path_factory.mktemp("ts"), store, [f"{MODEL}={MODEL}.mar"]) as ts:
        yield ts


def api(ts: TorchServe) -> Management:
    return Management(ts.url("management"), ts.token("management"), timeout_s=120)


def cli(ts: TorchServe, *argv: str) -> int:
    """Runs ``python -m scripts.manage`` (its main) against ``ts``; returns its exit code."""
    args = manage.get_args_parser().parse_args(
        ["--url", ts.url("management"), "--key-file", str(ts.workdir / "key_file.json"), *argv])
    return manage.main(args)


def versions(ts: TorchServe) -> dict[str, dict]:
    return {v["modelVersion"]: v for v in api(ts).describe(MODEL, "all")}


def default_version(ts: TorchServe) -> str:
    return api(ts).describe(MODEL)[0]["modelVersion"]


def predict(ts: TorchServe, version: str | None = None) -> list[str]:
    url = f"{ts.url('inference')}/predictions/{MODEL}" + (f"/{version}" if version else "")
    r = requests.put(url, data=encode(scene(seed=2)), headers=ts.headers("inference"), timeout=60)
    assert r.status_code == 200, r.text
    return [x["label"] for x in r.json()]


def traffic(ts: TorchServe, threads: int = 2) -> Traffic:
    return Traffic(f"{ts.url('inference')}/predictions/{MODEL}", encode(scene(seed=3)),
                   ts.headers("inference"), threads=threads)


def report(name: str, t: Traffic) -> None:
    print(f"\n[{name}] requests sent {len(t.responses)}, failed {len(t.failed)} "
          f"(statuses {sorted({r.status for r in t.failed})})")


def test_registration_from_outside_the_store_is_refused(server, store, tmp_path):
    outside = tmp_path / "evil.mar"
    shutil.copy(store / f"{MODEL}_v2.mar", outside)
    with zipfile.ZipFile(outside) as z:
        z.extractall(tmp_path / "evil_dir")
    attempts = ["http://127.0.0.1:9/evil.mar", "https://example.com/evil.mar",
                f"file://{outside}", str(outside), str(tmp_path / "evil_dir"), "../evil.mar",
                f"{store}/../{outside.name}"]
    for url in attempts:
        with pytest.raises(ManagementError) as err:
            api(server).register(url, model_name="evil")
        assert " 4" in str(err.value)[:9], (url, str(err.value))  # "HTTP 4xx: ..."
    # paths of the store's own archives (0.12: 500 "Model file already exists"), the store
    # folder itself ("foo/" registered it as a model) and "." or ".." : 400, saying what a url is
    for url in (str(store / f"{MODEL}_v2.mar"), "/", "foo/", ".", "..", f"./{MODEL}_v2.mar"):
        with pytest.raises(ManagementError) as err:
            api(server).register(url, model_name="evil")
        assert str(err.value).startswith("HTTP 400:") and "file name of an archive" in str(err.value), url
    # names no REST path can reach or remove ("../../x" registered a live worker in 0.12,
    # saved in every snapshot): 400, by query string or by JSON body
    for name in ("../../x", "a/b", "..", "x\x01y", " lead", "-x"):
        with pytest.raises(ManagementError) as err:
            api(server).register(f"{MODEL}_v2.mar", model_name=name)
        assert str(err.value).startswith("HTTP 400:") and "plain name" in str(err.value), name
    r = requests.post(f"{server.url('management')}/models", json={"url": f"{MODEL}_v2.mar",
                      "model_name": "../y"}, headers=server.headers("management"), timeout=30)
    assert r.status_code == 400 and "plain name" in r.json()["message"]
    assert [m["modelName"] for m in api(server).list()] == [MODEL]


def test_keys_expire_after_the_configured_time_and_renew(server, capsys):
    """config.properties' token_expiration_min (one day, not 0.12's hour) sets the keys'
    expiry; renew-key replaces a key with the API key; /ping needs the inference key."""
    import datetime
    import json

    from serving.server import read_properties
    key_file = server.workdir / "key_file.json"
    keys = json.loads(key_file.read_text())
    minutes = int(read_properties(server.config_path)["token_expiration_min"])
    assert minutes == 1440
    started = datetime.datetime.fromtimestamp(key_file.stat().st_mtime, datetime.timezone.utc)
    for api_name in ("inference", "management"):
        expires = datetime.datetime.fromisoformat(keys[api_name]["expiration time"][:26] + "+00:00")
        assert abs((expires - started).total_seconds() - 60 * minutes) < 120, (api_name, expires)
    ping = f"{server.url('inference')}/ping"
    assert requests.get(ping, timeout=10).status_code == 401
    assert requests.get(ping, headers=server.headers("inference"), timeout=10).status_code == 200
    old = keys["inference"]["key"]
    assert cli(server, "renew-key", "inference") == 0
    assert "new inference key written" in capsys.readouterr().out
    new = json.loads(key_file.read_text())["inference"]["key"]
    assert new != old and json.loads(key_file.read_text())["API"] == keys["API"]
    assert requests.get(ping, headers={"Authorization": f"Bearer {old}"}, timeout=10).status_code == 401
    assert requests.get(ping, headers={"Authorization": f"Bearer {new}"}, timeout=10).status_code == 200
    predict(server)  # the clients read the key file per call: they follow the renewal


def test_cli_reports_failures_with_exit_code(server, capsys):
    assert cli(server, "describe", "no-such-model") == 1
    assert "describe failed: HTTP 404" in capsys.readouterr().err
    assert cli(server, "list") == 0
    assert MODEL in capsys.readouterr().out


def test_version_rollout_under_load(server):
    with traffic(server) as t:
        t.wait_for(5)
        assert cli(server, "register", f"{MODEL}_v2.mar", "--workers", "1") == 0
        assert predict(server, "1.0")[0] in V1_LABELS  # explicit versions route independently
        assert predict(server, "2.0")[0] in V2_LABELS
        t.wait_for(5)
        assert cli(server, "set-default", MODEL, "2.0") == 0
        switched_at = time.monotonic()
        t.wait_for(10)
        assert cli(server, "unregister", MODEL, "1.0") == 0
        t.wait_for(10)
    report("rollout v1 -> v2", t)
    assert not t.failed, [(r.status, round(r.sent_at - t.responses[0].sent_at, 2), r.error) for r in t.failed]
    before = [r for r in t.responses if r.sent_at < switched_at - 1.0]
    after = [r for r in t.responses if r.sent_at > switched_at]
    assert before and all(set(r.labels) == set(V1_LABELS) for r in before)
    assert after and all(set(r.labels) == set(V2_LABELS) for r in after)
    assert list(versions(server)) == ["2.0"] and default_version(server) == "2.0"


def test_scaling_1_3_1_under_load(server, capsys):
    """Scaling up and back down under load answers every request.

    Stock TorchServe 0.12 lost the batch in flight on each removed worker (shutdown closed its
    channel at once); build/ts-patches.jar drains it first (scripts/ts_patches/). Six client
    threads keep batches in flight on every worker."""
    with traffic(server, threads=6) as t:
        t.wait_for(5)
        assert cli(server, "scale", MODEL, "--min-workers", "3") == 0
        workers = api(server).describe(MODEL)[0]["workers"]
        assert len(workers) == 3 and all(w["status"] == "READY" for w in workers), workers
        t.wait_for(20)
        scaled_up = len(t.responses)
        assert cli(server, "scale", MODEL, "--min-workers", "1") == 0
        t.wait_for(20)
    cli_output = capsys.readouterr().out
    with capsys.disabled():
        report("scale 1 -> 3 -> 1", t)
        print(f"[scale 1 -> 3] requests {scaled_up}")
    assert not t.failed, [(r.status, r.error) for r in t.failed]
    assert "retrying" not in cli_output  # no ConcurrentModificationException either
    assert len(api(server).describe(MODEL)[0]["workers"]) == 1
    assert predict(server)  # healthy afterwards
    log = (server.log_dir / "model_log.log").read_text() + (server.log_dir / "ts_log.log").read_text()
    assert log.count("before scale-down") >= 2, "the two removed workers were not drained"


def test_unregistering_the_default_version_while_others_exist(server):
    """Defined behaviour (TorchServe 0.12): 403 while another version exists; set another default first."""
    assert cli(server, "register", f"{MODEL}.mar") == 0  # 1.0 back beside the default 2.0
    assert default_version(server) == "2.0"
    with pytest.raises(ManagementError, match="HTTP 403: Cannot remove default version"):
        api(server).unregister(MODEL, "2.0")
    assert set(versions(server)) == {"1.0", "2.0"} and default_version(server) == "2.0"
    assert predict(server)[0] in V2_LABELS


def test_restart_restores_versions_default_and_workers(server):
    api(server).scale(MODEL, 2, version="2.0")
    before = {v: (d["minWorkers"], d["maxWorkers"], len(d["workers"])) for v, d in versions(server).items()}
    server.stop()
    server.restore = True  # from the shutdown snapshot, not from --models
    server.start()
    server.wait_ready([MODEL], timeout_s=180)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for every version's workers, not only the default's
        after = {v: (d["minWorkers"], d["maxWorkers"], len(d["workers"])) for v, d in versions(server).items()}
        if after == before:
            break
        time.sleep(1)
    assert after == before == {"1.0": (1, 1, 1), "2.0": (2, 2, 2)}
    assert default_version(server) == "2.0"
    assert predict(server)[0] in V2_LABELS and predict(server, "1.0")[0] in V1_LABELS
