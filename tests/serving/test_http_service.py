"""`dmqn serve` as a ranking system meets it: a real uvicorn server (`python -m dmqn_cli serve` on a free
port) in front of the embedded store and a real redis-server. Exact scores, every bad request, a token,
Redis killed under load, a reload under load, SIGTERM with requests in flight, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from conftest import free_port, redis_server, small_dmqn_run, tiny_set_workspace
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import CachedScorer, export_states, state_store
from dmqn_core.workspace import Workspace

TIMEOUT = httpx.Timeout(60.0)  # generous: the machine may be loaded; a hung request still fails the test
PASSWORD = "r3dis-Pa55w0rd"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(ws: Workspace, run_id: str, log: Path, *args: str) -> Iterator[Server]:
    """`dmqn serve RUN_ID *args` on a free port, ready (its /healthz answers), terminated on exit."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmqn_cli", "serve", run_id, "-w", str(ws.root), "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"dmqn serve exited with {process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"dmqn serve did not answer in time:\n{server.output()}")
        time.sleep(0.1)
    try:
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Workspace, str]:
    """A workspace of its own (the reload test rewrites its checkpoint) with a small DMQN run, exported."""
    ws = tiny_set_workspace(tmp_path_factory.mktemp("served"))
    run_id = small_dmqn_run(ws)
    export_states(ws, run_id)
    return ws, run_id


@pytest.fixture(scope="module")
def ids(served) -> tuple[list[int], list[int]]:
    """(every raw user id, every raw item id) of the run."""
    ws, run_id = served
    data = Run.open(ws, run_id).data
    users = data.raw_user(np.arange(1, data.n_users + 1)).tolist()
    items = data.raw_item(np.arange(1, data.n_items + 1)).tolist()
    return users, items


@pytest.fixture(scope="module")
def server(served, tmp_path_factory) -> Iterator[Server]:
    """The module's server on the embedded store, with small limits so that the bad requests are cheap."""
    ws, run_id = served
    log = tmp_path_factory.mktemp("server") / "serve.log"
    limits = ("--max-items", "150", "--max-users", "4", "--max-body-bytes", "20000")
    with serving(ws, run_id, log, *limits) as s:
        yield s


def post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(url, json=body, timeout=TIMEOUT, **kwargs)


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def expected_scores(ws: Workspace, run_id: str, user: int, items: list[int], source: str | None = None) -> list[float]:
    """What `dmqn score --json` prints for the user and items."""
    args = ["score", run_id, "--user", str(user), "--items", ",".join(map(str, items)), "--json", "-w", str(ws.root)]
    result = cli(*args, *(["--from", source] if source else []))
    assert result.exit_code == 0, result.output
    return [s["probability"] for s in json.loads(result.stdout)["scores"]]


# ---- scoring ----


def test_scores_equal_dmqn_score_exactly(server, served, ids):
    ws, run_id = served
    users, items = ids
    rng = np.random.default_rng(0)
    for user in rng.choice(users, size=3, replace=False).tolist():
        candidates = rng.choice(items, size=100, replace=True).tolist()  # repeats included
        answer = post(f"{server.url}/v1/score", {"user_id": user, "items": candidates})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["run_id"] == run_id and body["version"].startswith(run_id) and body["source"] == "model"
        assert [s["item_id"] for s in body["scores"]] == candidates and body["unknown_items"] == []
        assert [s["probability"] for s in body["scores"]] == expected_scores(ws, run_id, user, candidates)


def test_a_batch_scores_every_user_as_its_own_request_does(server, ids):
    users, items = ids
    requests = [{"user_id": u, "items": items[i : i + 20]} for i, u in enumerate(users[:4])]
    batch = post(f"{server.url}/v1/score:batch", {"requests": requests})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [r["user_id"] for r in results] == users[:4]
    for request, result in zip(requests, results):
        alone = post(f"{server.url}/v1/score", request).json()["scores"]
        # One batch stacks every user's clusters, so float32 sums may round differently in the last bit.
        assert np.allclose([s["probability"] for s in result["scores"]], [s["probability"] for s in alone], atol=1e-6)


def test_a_user_without_a_state_is_404_or_popularity_as_the_caller_asks(server, served, ids):
    ws, run_id = served
    _, items = ids
    stranger = 10**15
    refused = post(f"{server.url}/v1/score", {"user_id": stranger, "items": items[:3]})
    assert refused.status_code == 404
    assert refused.json()["error"] == "unknown_user" and str(stranger) in refused.json()["detail"]
    answer = post(f"{server.url}/v1/score?missing=popularity", {"user_id": stranger, "items": items[:3]})
    assert answer.status_code == 200 and answer.json()["source"] == "popularity"
    vocabulary = Run.open(ws, run_id).vocabulary
    counts = np.asarray(vocabulary.item_popularity)[vocabulary.item_index(np.array(items[:3]))]
    popularity = torch.sigmoid(torch.from_numpy(np.log1p(counts.astype(np.float32)))).tolist()
    assert [s["probability"] for s in answer.json()["scores"]] == popularity
    mixed = post(
        f"{server.url}/v1/score:batch?missing=popularity",
        {"requests": [{"user_id": ids[0][0], "items": items[:2]}, {"user_id": stranger, "items": items[:2]}]},
    )
    assert [r["source"] for r in mixed.json()["results"]] == ["model", "popularity"]


def test_an_unknown_item_is_scored_with_the_unknown_embedding_and_flagged(server, served, ids):
    ws, run_id = served
    users, items = ids
    unknown = 10**14
    body = post(f"{server.url}/v1/score", {"user_id": users[0], "items": [items[0], unknown]}).json()
    assert body["unknown_items"] == [unknown] and 0.0 < body["scores"][1]["probability"] < 1.0
    assert body["scores"][0]["probability"] == expected_scores(ws, run_id, users[0], [items[0], items[1]])[0]


BEYOND = 2**63


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"user_id": "12", "items": [1]}, 422, "user_id"),  # a string, even of digits
        ({"user_id": 1.0, "items": [1]}, 422, "user_id"),
        ({"user_id": True, "items": [1]}, 422, "user_id"),
        ({"user_id": 1, "items": []}, 422, "items"),
        ({"user_id": 1, "items": [1, "2"]}, 422, "items.1"),
        ({"user_id": 1, "items": 5}, 422, "items"),
        ({"user_id": 1}, 422, "items"),
        ({"user_id": 1, "items": [1], "extra": 2}, 422, "extra"),
        ({"user_id": BEYOND, "items": [1]}, 422, "user_id"),
        ({"user_id": -BEYOND - 1, "items": [1]}, 422, "user_id"),
        ({"user_id": 1, "items": [BEYOND]}, 422, "items.0"),
        ({"user_id": 1, "items": list(range(151))}, 422, "151 items"),
        ({"user_id": 1, "items": list(range(5000))}, 413, "20,000 bytes"),
        ([1, 2], 422, "body"),
    ],
)
def test_a_bad_request_is_a_one_line_json_reason(server, body, status, words):
    answer = post(f"{server.url}/v1/score", body)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert set(error) == {"error", "detail"} and words in error["detail"] and "\n" not in error["detail"]


@pytest.mark.parametrize(
    "content, headers, words",
    [
        (b'{"user_id": 1, "items": [1', {"content-type": "application/json"}, "not valid JSON"),
        (b'{"user_id": 1, "items": [' + b"9" * 5000 + b"]}", {"content-type": "application/json"}, "JSON"),
        (b'{"user_id": 1, "items": [1]}', {"content-type": "text/plain"}, "Content-Type: application/json"),
        (b"", {"content-type": "application/json"}, "no body"),
    ],
)
def test_a_body_that_is_not_json_is_422(server, content, headers, words):
    answer = httpx.post(f"{server.url}/v1/score", content=content, headers=headers, timeout=TIMEOUT)
    assert answer.status_code == 422 and words in answer.json()["detail"], answer.text


def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as the body arrives
        yield b'{"user_id": 1, "items": ['
        for _ in range(3000):
            yield b"123456789,"
        yield b"1]}"

    answer = httpx.post(
        f"{server.url}/v1/score", content=chunks(), headers={"content-type": "application/json"}, timeout=TIMEOUT
    )
    assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"


def test_batch_limits_and_query_values(server, ids):
    users, items = ids
    five = {"requests": [{"user_id": u, "items": items[:1]} for u in users[:5]]}
    assert post(f"{server.url}/v1/score:batch", five).status_code == 422
    assert post(f"{server.url}/v1/score:batch", {"requests": []}).status_code == 422
    wrong = post(f"{server.url}/v1/score?missing=guess", {"user_id": users[0], "items": items[:1]})
    assert wrong.status_code == 422 and "missing" in wrong.json()["detail"]
    assert httpx.get(f"{server.url}/v1/score", timeout=TIMEOUT).status_code == 405
    assert httpx.get(f"{server.url}/nowhere", timeout=TIMEOUT).json()["error"] == "not_found"


def test_health_readiness_metrics_and_schema(server, served, ids):
    _, run_id = served
    ready = httpx.get(f"{server.url}/readyz", timeout=TIMEOUT)
    assert ready.status_code == 200 and ready.json()["run_id"] == run_id
    post(f"{server.url}/v1/score", {"user_id": ids[0][0], "items": ids[1][:2]})
    post(f"{server.url}/v1/score", {"user_id": 10**15, "items": ids[1][:2]})
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    assert 'dmqn_requests_total{endpoint="/v1/score",status="200"}' in text
    assert 'dmqn_requests_total{endpoint="/v1/score",status="404"}' in text
    assert 'dmqn_state_lookups_total{result="hit"}' in text and 'dmqn_state_lookups_total{result="miss"}' in text
    assert 'dmqn_request_seconds_bucket{endpoint="/v1/score",le="0.01"}' in text and "dmqn_store_errors_total" in text
    schema = httpx.get(f"{server.url}/openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/score", "/v1/score:batch", "/healthz", "/readyz", "/metrics", "/admin/reload"} <= set(schema["paths"])
    assert "Traceback" not in server.output()


# ---- the token ----


def test_a_bearer_token_is_required_and_never_logged(served, ids, tmp_path):
    ws, run_id = served
    token = "t0ken-" + "x" * 30
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    body = {"user_id": ids[0][0], "items": ids[1][:2]}
    with serving(ws, run_id, tmp_path / "serve.log", "--token-file", str(token_file), "--access-log") as s:
        assert post(f"{s.url}/v1/score", body).status_code == 401
        wrong = post(f"{s.url}/v1/score", body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        assert post(f"{s.url}/admin/reload", {}).status_code == 401
        assert post(f"{s.url}/v1/score", body, headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{s.url}/readyz", timeout=TIMEOUT).status_code == 200  # probes need no token
        s.process.terminate()
        s.process.wait(timeout=60)
        output = s.output()
    assert "POST /v1/score" in output  # the access log was on
    assert token not in output and "t0ken" not in output


@pytest.mark.parametrize("content", [None, "", "two words\n"])
def test_a_bad_token_file_is_one_line(served, tmp_path, content):
    ws, run_id = served
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    result = cli("serve", run_id, "-w", str(ws.root), "--port", str(free_port()), "--token-file", str(token_file))
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "two" not in result.output and "words" not in result.output


def test_startup_errors_are_one_line(served):
    ws, run_id = served
    port = free_port()
    bad_run = cli("serve", "no-such-run", "-w", str(ws.root), "--port", str(port))
    assert bad_run.exit_code == 1 and bad_run.output.startswith("error: ") and bad_run.output.count("\n") == 1
    uri = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    unreachable = cli("serve", run_id, "-w", str(ws.root), "--port", str(port), "--from", uri)
    assert unreachable.exit_code == 1 and "cannot reach Redis" in unreachable.output
    assert PASSWORD not in unreachable.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli("serve", run_id, "-w", str(ws.root), "--port", str(taken.getsockname()[1]))
    assert busy.exit_code == 1 and "the port is in use" in busy.output and busy.output.count("\n") == 1


# ---- faults ----


class Load:
    """Clients scoring in threads until stopped; each answer is kept as (status, body)."""

    def __init__(self, url: str, requests: list[dict], clients: int = 4) -> None:
        self.url, self.requests = url, requests
        self.answers: list[tuple[int, dict]] = []
        self.failures: list[str] = []  # a transport error: a dropped or hung request
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def _client(self, n: int) -> None:
        with httpx.Client(timeout=TIMEOUT) as client:
            i = n
            while not self._stop.is_set():
                request = self.requests[i % len(self.requests)]
                i += 1
                try:
                    answer = client.post(f"{self.url}/v1/score", json=request)
                    with self._lock:
                        self.answers.append((answer.status_code, answer.json()))
                except (httpx.TransportError, ValueError) as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def count(self, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for s, _ in self.answers if status is None or s == status)


def test_redis_killed_under_load_answers_503_then_recovers(served, ids, tmp_path):
    ws, run_id = served
    users, items = ids
    requests = [{"user_id": u, "items": items[(7 * n) % 50 : (7 * n) % 50 + 100]} for n, u in enumerate(users[:20])]
    with redis_server(tmp_path) as port:
        uri = f"redis://127.0.0.1:{port}/0"
        export_states(ws, run_id, to=uri)
        expected = {}
        with CachedScorer(ws, run_id, source=uri) as scorer:
            for r in requests:
                expected[r["user_id"]] = scorer.score(r["user_id"], r["items"]).tolist()
        client = redis.Redis(port=port)
        client.save()  # the restarted server reads the states back from dump.rdb in the same folder
        pid = client.info("server")["process_id"]
        client.close()
        with (
            serving(ws, run_id, tmp_path / "serve.log", "--from", uri, "--store-timeout", "0.5") as s,
            Load(s.url, requests) as load,
        ):
            load.wait_for(lambda: load.count(200) >= 300, "300 answers before the kill")
            os.kill(pid, signal.SIGKILL)
            load.wait_for(lambda: load.count(503) >= 100, "503s while Redis is down")
            down = httpx.get(f"{s.url}/readyz", timeout=TIMEOUT)
            assert down.status_code == 503 and down.json()["error"] == "store_unavailable"
            with redis_server(tmp_path, port=port):
                load.wait_for(lambda: httpx.get(f"{s.url}/readyz", timeout=TIMEOUT).status_code == 200, "readiness")
                recovered = load.count(200)
                load.wait_for(
                    lambda: load.count(200) >= recovered + 300 and load.count() >= 1000, "300 answers after recovery"
                )
                text = httpx.get(f"{s.url}/metrics", timeout=TIMEOUT).text
                store_errors = next(
                    float(x.split()[-1]) for x in text.splitlines() if x.startswith("dmqn_store_errors_total")
                )
        assert not load.failures, load.failures[:3]
        # After a failure the store is left alone for --store-timeout: most 503s never waited on Redis.
        assert 0 < 2 * store_errors < load.count(503)
        for status, body in load.answers:
            assert status in (200, 503), (status, body)
            if status == 200:  # never a wrong answer
                assert [x["probability"] for x in body["scores"]] == expected[body["user_id"]]
            else:
                assert body["error"] == "store_unavailable" and "\n" not in body["detail"]
        assert "Traceback" not in s.output()


def test_reload_under_load_switches_without_a_failed_request(served, ids, tmp_path):
    ws, run_id = served
    users, items = ids
    requests = [{"user_id": u, "items": items[:100]} for u in users[:10]]
    best = ws.run_dir(run_id) / "best.pt"
    original = best.read_bytes()
    store = state_store(ws)
    with CachedScorer(ws, run_id) as scorer:
        old_version = scorer.version
        old = {r["user_id"]: scorer.score(r["user_id"], r["items"]).tolist() for r in requests}
    try:
        with serving(ws, run_id, tmp_path / "serve.log") as s, Load(s.url, requests) as load:
            load.wait_for(lambda: load.count() >= 200, "answers before the new checkpoint")
            checkpoint = torch.load(best, weights_only=True)
            checkpoint["model_state"]["head.net.0.bias"] += 1.0
            torch.save(checkpoint, best)
            refused = post(f"{s.url}/admin/reload", {})
            assert refused.status_code == 409 and "no exported states" in refused.json()["detail"]
            result = export_states(ws, run_id)
            manifest = store.manifest(result.version)
            shape = (manifest["n_codebooks"], manifest["codebook_size"], manifest["dim"])
            store.write_manifest(result.version, run_id, "float32", shape, complete=False)  # as during an export
            unfinished = post(f"{s.url}/admin/reload", {})
            assert unfinished.status_code == 409 and "still being exported" in unfinished.json()["detail"]
            store.write_manifest(result.version, run_id, "float32", shape)
            with CachedScorer(ws, run_id) as scorer:
                new = {r["user_id"]: scorer.score(r["user_id"], r["items"]).tolist() for r in requests}
            before = load.count()
            switched = post(f"{s.url}/admin/reload", {})
            assert switched.status_code == 200 and switched.json()["switched"], switched.text
            assert switched.json() == {**switched.json(), "version": result.version, "previous_version": old_version}
            load.wait_for(lambda: load.count() >= before + 200, "answers after the switch")
    finally:
        best.write_bytes(original)
        store.close()
    assert not load.failures, load.failures[:3]
    versions = [body["version"] for _, body in load.answers]
    assert {status for status, _ in load.answers} == {200}
    assert set(versions) == {old_version, result.version} and result.version != old_version
    for _, body in load.answers:  # each answer wholly of one version: never old states with the new model
        want = (old if body["version"] == old_version else new)[body["user_id"]]
        assert [x["probability"] for x in body["scores"]] == want


def test_watch_switches_once_the_new_export_has_finished(served, ids, tmp_path):
    ws, run_id = served
    users, items = ids
    request = {"user_id": users[0], "items": items[:10]}
    best = ws.run_dir(run_id) / "best.pt"
    original = best.read_bytes()
    try:
        with serving(ws, run_id, tmp_path / "serve.log", "--watch", "0.2") as s:
            old_version = post(f"{s.url}/v1/score", request).json()["version"]
            checkpoint = torch.load(best, weights_only=True)
            checkpoint["model_state"]["head.net.0.bias"] -= 1.0
            torch.save(checkpoint, best)
            time.sleep(1.0)  # several checks see the new checkpoint without an export: nothing changes
            assert post(f"{s.url}/v1/score", request).json()["version"] == old_version
            new_version = export_states(ws, run_id).version
            deadline = time.monotonic() + 120
            while (answer := post(f"{s.url}/v1/score", request)).json()["version"] != new_version:
                assert answer.status_code == 200 and time.monotonic() < deadline, answer.text
                time.sleep(0.1)
    finally:
        best.write_bytes(original)


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(served, ids, tmp_path):
    ws, run_id = served
    users, items = ids
    big = {"requests": [{"user_id": u, "items": (items * 5)[:1000]} for u in users[:64]]}
    answers: list[httpx.Response | Exception] = []

    def client() -> None:
        try:
            answers.append(httpx.post(f"{s.url}/v1/score:batch", json=big, timeout=TIMEOUT))
        except httpx.TransportError as exc:
            answers.append(exc)

    with serving(ws, run_id, tmp_path / "serve.log") as s:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while True:  # every batch received (in flight or answered), some still in flight, then the signal
            text = httpx.get(f"{s.url}/metrics", timeout=TIMEOUT).text
            line = next(x for x in text.splitlines() if x.startswith("dmqn_requests_in_flight"))
            in_flight = int(float(line.split()[-1])) - 1  # less this metrics request
            if in_flight + len(answers) >= 6:
                assert in_flight >= 1, "every batch was answered before the signal; make them larger"
                break
            assert time.monotonic() < deadline, f"the server received {in_flight + len(answers)} of 6 batches"
        s.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert s.process.wait(timeout=120) == 0, s.output()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/healthz", timeout=5)
    assert len(answers) == 6
    for answer in answers:  # every request the server had received got its whole answer
        assert isinstance(answer, httpx.Response) and answer.status_code == 200, (answer, s.output())
        assert len(answer.json()["results"]) == 64


def test_several_workers_share_the_port_and_sum_their_metrics(served, ids, tmp_path):
    ws, run_id = served
    users, items = ids
    with serving(ws, run_id, tmp_path / "serve.log", "--workers", "2") as s:
        for user in users[:40]:  # a connection each, for the kernel to hand to either worker
            assert post(f"{s.url}/v1/score", {"user_id": user, "items": items[:5]}).status_code == 200
        text = httpx.get(f"{s.url}/metrics", timeout=TIMEOUT).text
        count = next(
            float(x.split()[-1])
            for x in text.splitlines()
            if x.startswith('dmqn_requests_total{endpoint="/v1/score",status="200"}')
        )
        assert count == 40
