"""examples/service.py: the HTTP service is started on 127.0.0.1, answers real requests over the
socket (concurrent ones in shared batches), maps each error to its status code, and stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import lookup_bundle, planted

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from engine import Engine  # noqa: E402
from engine.dynamic_batching import BatchingEngine  # noqa: E402
from examples.service import create_app  # noqa: E402

ANSWER = "Zanzibar Island"
CONTEXT = "After a long voyage the ship sailed to Zanzibar Island, then home again."
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("service"), **planted(ANSWER), max_seq_len=64)


class Server:
    """uvicorn serving an app on a socket bound to 127.0.0.1:0, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def engine(bundle: Path) -> Iterator[BatchingEngine]:
    be = BatchingEngine(Engine(bundle, backend="onnxruntime", threads=1), max_batch_size=8, max_delay_ms=20,
                        max_queue_size=64)
    yield be
    be.close()
    be.engine.close()


def test_answers_over_http_and_closes_the_engine_on_shutdown(engine: BatchingEngine) -> None:
    with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=20) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["backend"] == "onnxruntime"
        r = client.post("/answer", json={"question": "Where did the ship sail?", "context": CONTEXT})
        assert r.status_code == 200
        (a,) = r.json()["answers"]
        assert a["answer"] == ANSWER and CONTEXT[a["start"]:a["end"]] == ANSWER and 0 < a["score"] <= 1
        r = client.post("/answer", json={"question": "Where?", "context": CONTEXT, "top_k": 3})
        answers = r.json()["answers"]
        assert r.status_code == 200 and 1 < len(answers) <= 3 and answers[0]["answer"] == ANSWER
        assert [x["score"] for x in answers] == sorted((x["score"] for x in answers), reverse=True)
    assert engine.closed  # the lifespan shutdown closed it (after answering what was queued)


def test_concurrent_requests_share_batches(engine: BatchingEngine) -> None:
    results: list[Any] = [None] * 16
    with Server(create_app(engine)) as srv:
        def call(i: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=20) as client:
                results[i] = client.post("/answer", json={"question": f"Where did ship {i} sail?", "context": CONTEXT})

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        stats = engine.stats()
    assert all(r.status_code == 200 and r.json()["answers"][0]["answer"] == ANSWER for r in results)
    assert stats["answered"] == 16 and stats["batches"] < 16  # some requests were answered together


@pytest.mark.parametrize(("body", "status", "kind"), [
    (b"{not json", 400, "bad_json"),
    (b'["question", "context"]', 400, "bad_request"),
    (b'{"question": "Where?"}', 400, "bad_request"),
    (b'{"question": "Where?", "context": "x", "topk": 2}', 400, "bad_request"),
    (b'{"question": "Where?", "context": "   "}', 400, "invalid_input"),
    (b'{"question": "Where?", "context": "ship", "top_k": 0}', 400, "invalid_input"),
    (b'{"question": 7, "context": "ship"}', 400, "invalid_input"),
    (b'{"question": "Where?", "context": "ship", "timeout": "soon"}', 400, "invalid_input"),
    # hostile bodies (issue 19): each was a 500 before
    (b"[" * 100_000 + b"]" * 100_000, 400, "bad_json"),
    (b'{"question": "Where?", "context": "ship", "top_k": ' + b"9" * 5000 + b"}", 400, "bad_json"),
    (b'{"question": "Where?", "context": "ship", "null_threshold": 1e400}', 400, "bad_json"),
    (b'{"question": "Where?", "context": "ship", "null_threshold": NaN}', 400, "bad_json"),
    (b'{"question": "Where?", "context": "ship", "timeout": ' + b"9" * 39 + b"}", 400, "invalid_input"),
    (b'{"question": "Where?", "context": "ship", "timeout": 1e300}', 400, "invalid_input"),
    (b'{"question": "Where?", "context": "ship", "null_threshold": ' + b"9" * 39 + b"}", 400, "invalid_input"),
    (b'{"question": "Where?", "context": "ship", "max_answer_len": 1e30}', 400, "invalid_input"),
    (b'{"question": [[[[["Where?"]]]]], "context": "ship"}', 400, "invalid_input"),
])
def test_bad_requests_are_400_with_the_reason(engine: BatchingEngine, body: bytes, status: int, kind: str) -> None:
    with Server(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=20) as client:
        r = client.post("/answer", content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (status, kind)
        assert r.json()["message"]
        assert client.post("/answer", json={"question": "Where?", "context": CONTEXT}).status_code == 200


def test_overload_timeout_size_and_closed_engine_statuses(bundle: Path) -> None:
    eng = Engine(bundle, backend="onnxruntime", threads=1)
    release = threading.Event()
    entered = threading.Event()
    real = eng.answer_batch

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    eng.answer_batch = held  # type: ignore[method-assign]
    be = BatchingEngine(eng, max_batch_size=1, max_delay_ms=0, max_queue_size=1, timeout_s=None)
    try:
        with Server(create_app(be, max_body_bytes=4096)) as srv, httpx.Client(base_url=srv.url, timeout=20) as client:
            assert client.post("/answer", content=b"x" * 5000).status_code == 413
            first: list[Any] = []
            t = threading.Thread(target=lambda: first.append(
                httpx.post(srv.url + "/answer", json={"question": "Where?", "context": CONTEXT}, timeout=20)))
            t.start()
            assert entered.wait(10)  # request 1 holds the worker
            r = client.post("/answer", json={"question": "Where?", "context": CONTEXT, "timeout": 0.05})
            assert (r.status_code, r.json()["error"]) == (504, "timeout")  # request 2 timed out in the queue
            t2 = threading.Thread(target=lambda: httpx.post(srv.url + "/answer", json={"question": "Q?", "context": CONTEXT},
                                                            timeout=20))
            t2.start()
            while be.stats()["queued"] < 1:
                time.sleep(0.005)
            r = client.post("/answer", json={"question": "Where?", "context": CONTEXT})  # request 4: queue is full
            assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (503, "overloaded", "1")
            release.set()
            t.join(20)
            t2.join(20)
            assert first[0].status_code == 200
            be.close()
            r = client.post("/answer", json={"question": "Where?", "context": CONTEXT})
            assert (r.status_code, r.json()["error"]) == (503, "shutting_down")
            assert client.get("/healthz").status_code == 503
    finally:
        release.set()
        be.close()
        eng.close()


def test_command_line_service_starts_answers_and_stops_on_sigterm(bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with subprocess.Popen(
        [sys.executable, "-m", "examples.service", "--model", str(bundle), "--backend", "onnxruntime", "--threads", "1",
         "--port", str(port), "--log-level", "info"],
        cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "error"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:
        _serve_one_request_then_stop(proc, port)


def _serve_one_request_then_stop(proc: subprocess.Popen[bytes], port: int) -> None:
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not come up within 60 s"
            time.sleep(0.1)
        r = httpx.post(url + "/answer", json={"question": "Where did the ship sail?", "context": CONTEXT}, timeout=20)
        assert r.status_code == 200 and r.json()["answers"][0]["answer"] == ANSWER
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15).
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode()  # type: ignore[union-attr]
        assert "engine closed: 1 calls answered in 1 batches" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_work_per_request_is_bounded_and_a_dead_worker_shows_in_health(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_context = " ".join(["The crew mended sails and counted stores."] * 80) + " " + CONTEXT
    be = BatchingEngine(Engine(bundle, backend="onnxruntime", threads=1, max_windows=3), max_delay_ms=0)
    try:
        with Server(create_app(be)) as srv, httpx.Client(base_url=srv.url, timeout=20) as client:
            r = client.post("/answer", json={"question": "Where?", "context": long_context})
            assert (r.status_code, r.json()["error"]) == (413, "too_much_work")
            assert "max_windows=3" in r.json()["message"]
            assert client.post("/answer", json={"question": "Where?", "context": CONTEXT}).status_code == 200
            assert client.get("/healthz").json()["status"] == "ok"

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise SystemExit("worker thread torn down")  # not an Exception: it ends the worker

            monkeypatch.setattr(be.engine, "answer_batch", broken)
            r = client.post("/answer", json={"question": "Where?", "context": CONTEXT})
            assert (r.status_code, r.json()["error"]) == (503, "worker_died")
            h = client.get("/healthz")
            assert (h.status_code, h.json()["error"]) == (503, "worker_died")
            r = client.post("/answer", json={"question": "Where?", "context": CONTEXT})
            assert (r.status_code, r.json()["error"]) == (503, "worker_died")
    finally:
        be.close()
        be.engine.close()


def test_command_line_settings_out_of_range_are_one_line_errors(bundle: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "examples.service", "--model", str(bundle), "--backend", "onnxruntime", "--threads", "1",
         "--max-delay-ms", "1e13"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "error: max_delay_ms must be a number between 0 and 60000" in proc.stderr and "Traceback" not in proc.stderr
