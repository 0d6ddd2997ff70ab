"""Dynamic batching in a real TorchServe with our frontend agent (scripts/ts_patches/).

IdleDispatch: a request that reaches an idle model goes to the worker at once instead of
waiting ``maxBatchDelay`` for company (rule 1), and a batch whose clients (the connections of
the last batch) are all back goes without waiting out the rest of the delay (rule 2); under
concurrent load batches still form. The archive uses a long maxBatchDelay (1.5 s) and batchSize
8 so that the behaviours are told apart by a wide margin, not by tight timings: upstream
TorchServe (``TS_IDLE_DISPATCH=0``) holds every lone request for the whole delay, and with rule 1
alone (``TS_IDLE_DISPATCH=idle``) a batch of three clients waits it too.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import build_archive, running_server

pytestmark = pytest.mark.e2e
MODEL = "tiny3"
DELAY_MS = 1500


@pytest.fixture(scope="module")
def store(tmp_path_factory, three_class_checkpoint):
    store = tmp_path_factory.mktemp("store")
    build_archive(three_class_checkpoint, store, MODEL, "--batch-size", "8",
                  "--max-batch-delay", str(DELAY_MS), "--num-threads", "1")
    return store


def timed_puts(put, url: str, body: bytes, auth: dict, n: int) -> list[float]:
    """Latency of ``n`` requests sent one after another with ``put`` (``requests.put``: a new
    connection each; ``Session.put``: one keep-alive connection)."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = put(url, data=body, headers=auth, timeout=60)
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return out


def lone_request_seconds(ts, body: bytes, n: int = 4) -> list[float]:
    """Latency of ``n`` requests sent one after another (each finds the model idle)."""
    url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")
    return timed_puts(requests.put, url, body, auth, n)


def batch_size_sum_and_count(ts) -> tuple[float, float]:
    """(images, batches) from the handler's classifier_batch_size histogram."""
    text = requests.get(f"{ts.url('metrics')}/metrics", timeout=10).text
    values = {}
    for suffix in ("sum", "count"):
        match = re.search(rf"^classifier_batch_size_{suffix}{{[^}}]*}} (\S+)$", text, re.M)
        values[suffix] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def test_lone_requests_skip_the_batch_delay_and_load_still_batches(tmp_path, store, jpeg_bytes):
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"]) as ts:
        lone = lone_request_seconds(ts, jpeg_bytes)
        # the first request also warms up the frontend's code paths; upstream: >= 1.5 s each
        assert max(lone[1:]) < DELAY_MS / 1000 / 2, lone

        images_before, batches_before = batch_size_sum_and_count(ts)
        url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(
                lambda _: requests.put(url, data=jpeg_bytes, headers=auth, timeout=60).status_code,
                range(12)))
        assert statuses == [200] * 12
        images, batches = batch_size_sum_and_count(ts)
        images, batches = images - images_before, batches - batches_before
        assert images == 12
        # One short batch may go out at once (the model was idle); the requests queued behind
        # it are batched as upstream does.
        assert batches <= 4, (images, batches)
        assert "patched org/pytorch/serve/wlm/Model" in (ts.log_dir / "console.log").read_text()


def test_switched_off_lone_requests_wait_for_the_delay_as_upstream(tmp_path, store, jpeg_bytes):
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"],
                        env={"TS_IDLE_DISPATCH": "0"}) as ts:
        lone = lone_request_seconds(ts, jpeg_bytes, n=2)
        assert min(lone) >= DELAY_MS / 1000, lone


def closed_loop_seconds(ts, body: bytes, clients: int = 3, rounds: int = 4) -> list[list[float]]:
    """``clients`` keep-alive clients (one ``requests.Session`` each, started together), each
    sending its next request when it has the answer to the last; per client, the latencies."""
    url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")

    def client(_):
        with requests.Session() as session:
            return timed_puts(session.put, url, body, auth, rounds)
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(client, range(clients)))


def test_a_batch_goes_when_its_clients_are_in(tmp_path, store, jpeg_bytes):
    # Three clients in a closed loop and batchSize 8: upstream waits the whole 1.5 s for a
    # batch that cannot fill; the cohort rule sends it once the three are back.
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"]) as ts:
        lone_request_seconds(ts, jpeg_bytes, n=1)  # warm-up
        images_before, batches_before = batch_size_sum_and_count(ts)
        latencies = closed_loop_seconds(ts, jpeg_bytes)
        images, batches = batch_size_sum_and_count(ts)
        images, batches = images - images_before, batches - batches_before
    # A client's last request may wait out the delay once: a client that has finished (its
    # connection still open) is among those expected. Every request in between goes early.
    middle = [s for per_client in latencies for s in per_client[1:-1]]
    assert max(middle) < DELAY_MS / 1000 / 2, latencies
    assert images == 12 and images / batches >= 2, (images, batches)  # still batched


def test_with_the_idle_rule_alone_a_batch_that_cannot_fill_waits_the_delay(
        tmp_path, store, jpeg_bytes):
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"],
                        env={"TS_IDLE_DISPATCH": "idle"}) as ts:
        lone = lone_request_seconds(ts, jpeg_bytes, n=2)
        assert max(lone[1:]) < DELAY_MS / 1000 / 2, lone  # rule 1 still holds
        latencies = closed_loop_seconds(ts, jpeg_bytes, rounds=3)
    later = sorted(s for per_client in latencies for s in per_client[1:])
    # the batches of two or three clients wait out maxBatchDelay (rule 1 lets a batch go at
    # once only after a batch of one)
    assert later[len(later) // 2] >= DELAY_MS / 1000, latencies


def grpc_seconds(ts, body: bytes, n: int) -> tuple[list[float], list[bytes]]:
    """Latency and answer of ``n`` gRPC ``Predictions`` calls sent one after another on one
    channel (``serving.grpc_client``)."""
    import grpc
    from serving.grpc_client import predict

    key = ts.token("inference")
    times, answers = [], []
    with grpc.insecure_channel(f"127.0.0.1:{ts.props['grpc_inference_port']}") as channel:
        for _ in range(n):
            start = time.perf_counter()
            answers.append(predict(channel, MODEL, body, key=key))
            times.append(time.perf_counter() - start)
    return times, answers


def test_grpc_jobs_are_answered_and_their_batches_wait_no_longer_than_upstream(
        tmp_path, store, jpeg_bytes):
    # A gRPC job has no HTTP connection for the cohort rule to count: a batch holding one waits
    # as upstream does (at most maxBatchDelay), and everything in it is answered.
    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"]) as ts:
        url, auth = f"{ts.url('inference')}/predictions/{MODEL}", ts.headers("inference")
        expected = requests.put(url, data=jpeg_bytes, headers=auth, timeout=60).json()
        lone, answers = grpc_seconds(ts, jpeg_bytes, 3)
        assert [json.loads(a) for a in answers] == [expected] * 3  # the handler's own answer
        assert max(lone[1:]) < DELAY_MS / 1000 / 2, lone  # rule 1 holds for gRPC too

        with ThreadPoolExecutor(3) as pool:  # two HTTP clients and one gRPC client together
            http = [pool.submit(lambda: timed_puts(requests.Session().put, url, jpeg_bytes,
                                                   auth, 3)) for _ in range(2)]
            grpc_times, grpc_answers = pool.submit(grpc_seconds, ts, jpeg_bytes, 3).result()
            http_times = [f.result() for f in http]
        assert [json.loads(a) for a in grpc_answers] == [expected] * 3
        every = grpc_times + [s for per_client in http_times for s in per_client]
        assert max(every) < DELAY_MS / 1000 + 1.0, (grpc_times, http_times)
        # and they do wait it (measured: 1.52-1.54 s each): the first batch may go at once
        assert sorted(grpc_times)[1] >= DELAY_MS / 1000, grpc_times
        assert "Exception" not in "".join(ts.new_log_lines("ts_log.log")), ts.log_tail()


def test_a_bad_grpc_request_gets_an_error_status_and_its_batch_is_answered(
        tmp_path, store, jpeg_bytes, capsys):
    # Three calls at once wait out the delay together (gRPC jobs: upstream batching), so one
    # batch holds the two photos and the bytes that are not an image.
    import grpc
    from serving.grpc_client import predict

    with running_server(tmp_path, store, [f"{MODEL}={MODEL}.mar"]) as ts:
        key = ts.token("inference")
        images_before, batches_before = batch_size_sum_and_count(ts)
        with grpc.insecure_channel(f"127.0.0.1:{ts.props['grpc_inference_port']}") as channel:
            def call(body):
                try:
                    return json.loads(predict(channel, MODEL, body, key=key))
                except grpc.RpcError as exc:
                    return exc.code(), json.loads(exc.details())
            with ThreadPoolExecutor(3) as pool:
                good, bad, good2 = pool.map(call, [jpeg_bytes, b"not an image", jpeg_bytes])
            # the worker is still up: the next call is answered
            after = call(jpeg_bytes)
        assert good and good == good2 == after and all({"label", "index", "probability"} <= set(r) for r in good), good
        code, message = bad
        assert code == grpc.StatusCode.INVALID_ARGUMENT, bad  # 0.12 answered it as a success
        assert message["code"] == 400 and "cannot identify image" in message["message"], bad
        images, batches = batch_size_sum_and_count(ts)
        assert batches - batches_before <= 3, (images, batches)  # batched, not one by one
        assert "patched org/pytorch/serve/job/GRPCJob" in (ts.log_dir / "console.log").read_text()
        # the command line: one answer per file, the error on stderr, exit status 1
        from serving import grpc_client

        (tmp_path / "good.jpg").write_bytes(jpeg_bytes)
        (tmp_path / "bad.jpg").write_bytes(b"not an image")
        status = grpc_client.main([str(tmp_path / "good.jpg"), str(tmp_path / "bad.jpg"),
                                   "--address", f"127.0.0.1:{ts.props['grpc_inference_port']}",
                                   "--model", MODEL, "--key-file", str(ts.workdir / "key_file.json")])
    out, err = capsys.readouterr()
    assert status == 1 and json.loads(out.split(": ", 1)[1]) == good
    assert "bad.jpg: INVALID_ARGUMENT" in err and "cannot identify image" in err
