"""A real Triton Inference Server (the tritonserver of the nvidia-pytriton wheel) serving the
repository of ``python -m export triton --target cpu``, on 127.0.0.1 and free ports, stopped by its
process group. Answers over HTTP (Triton's JSON protocol) and gRPC (tritonclient) must equal
``engine.Engine``'s on the same bundle; bad requests get error responses and the server keeps
serving; 16 concurrent clients lose nothing; the metrics show batches larger than one.

Skipped where the wheel's server cannot run (not x86-64 Linux, glibc < 2.35) or is not installed;
in CI (``CI`` set) a missing install or stub environment is a failure, not a skip.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import lookup_bundle, planted

from engine import Answer, Engine
from engine.errors import BackendUnavailableError
from engine.serve import TritonServer, check_python_env, default_python_env, find_tritonserver, free_ports, start_triton
from export.triton import CPU_MODEL, TritonOptions, write_repository
from export.triton_check import validate_repository

grpcclient = pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")
from test_triton import ANSWER  # noqa: E402
from test_triton import PAIRS as REPOSITORY_PAIRS  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

PAIRS = [*REPOSITORY_PAIRS, ("Wo liegt es? ünïcödé ✓", "Es liegt auf Zanzibar Island, sagt man 🙂.")]
TIMEOUT_S = 60.0
OUTPUTS = ("ANSWER", "SCORE", "START", "END", "IMPOSSIBLE")


def _server_or_skip() -> Path | None:
    """The stub's Python environment; skips (or, in CI, fails) when the server cannot run here."""
    try:
        find_tritonserver()
    except BackendUnavailableError as e:
        if os.environ.get("CI") and "not found" in str(e):
            pytest.fail(f"CI must run the Triton server test: {e}")
        pytest.skip(str(e))
    env = default_python_env()
    try:
        check_python_env(env)
    except BackendUnavailableError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Triton server test: {e}")
        pytest.skip(str(e))
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lookup_bundle(tmp_path_factory.mktemp("triton-server-bundle"), **planted(ANSWER), max_seq_len=64)


@pytest.fixture(scope="module")
def engine(bundle: Path) -> Iterator[Engine]:
    with Engine(bundle, backend="auto") as e:
        yield e


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    env = _server_or_skip()
    # 5 ms of batching delay: 16 concurrent clients of a fast model reliably meet in one batch
    opts = TritonOptions(target="cpu", max_batch_size=16, max_queue_delay_us=5000, max_context_bytes=100_000)
    repo = write_repository(bundle, tmp_path_factory.mktemp("triton-server") / "repo", opts)
    validate_repository(repo)
    with start_triton(repo, python_env=env, timeout_s=240) as s:
        yield s
        assert s.process.poll() is None, "tritonserver died during the tests:\n" + s.log()[-3000:]


@pytest.fixture(scope="module")
def grpc(server: TritonServer) -> Any:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


# ---- clients --------------------------------------------------------------------------------------------
def _rows(pairs: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> dict[str, np.ndarray]:
    as_bytes = [[v.encode() if isinstance(v, str) else v for v in pair] for pair in pairs]
    return {"QUESTION": np.array([[q] for q, _ in as_bytes], dtype=np.object_),
            "CONTEXT": np.array([[c] for _, c in as_bytes], dtype=np.object_)}


_DTYPES = {np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}


def grpc_infer(client: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One gRPC request; the outputs by name (an InferenceServerException for an error response)."""
    inputs = []
    for name, a in arrays.items():
        t = grpcclient.InferInput(name, list(a.shape), "BYTES" if a.dtype == np.object_ else _DTYPES[a.dtype])
        t.set_data_from_numpy(a)
        inputs.append(t)
    result = client.infer(CPU_MODEL, inputs, client_timeout=TIMEOUT_S)
    return {n: result.as_numpy(n) for n in OUTPUTS}


def http_infer(server: TritonServer, arrays: dict[str, Any], datatypes: dict[str, str] | None = None) -> httpx.Response:
    """One request in Triton's JSON protocol (KServe v2)."""
    inputs = []
    for name, a in arrays.items():
        a = np.asarray(a)
        dt = (datatypes or {}).get(name) or ("BYTES" if a.dtype == np.object_ else _DTYPES[a.dtype])
        data = [v.decode() if isinstance(v, bytes) else v.item() for v in a.reshape(-1)]
        inputs.append({"name": name, "shape": list(a.shape), "datatype": dt, "data": data})
    return httpx.post(f"http://{server.http_url}/v2/models/{CPU_MODEL}/infer", json={"inputs": inputs}, timeout=TIMEOUT_S)


def http_outputs(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    out = {}
    for o in response.json()["outputs"]:
        data = [v.encode() for v in o["data"]] if o["datatype"] == "BYTES" else o["data"]
        out[o["name"]] = np.array(data, dtype=np.object_ if o["datatype"] == "BYTES" else None).reshape(o["shape"])
    return out


def assert_answers(got: dict[str, np.ndarray], row: int, want: list[Answer]) -> None:
    k = len(want)
    assert [v.decode() for v in got["ANSWER"][row][:k]] == [a.text for a in want]
    assert got["START"][row][:k].tolist() == [a.start for a in want]
    assert got["END"][row][:k].tolist() == [a.end for a in want]
    assert [bool(v) for v in got["IMPOSSIBLE"][row][:k]] == [a.impossible for a in want]
    assert got["SCORE"][row][:k].tolist() == pytest.approx([a.score for a in want], rel=1e-5, abs=1e-7)
    assert all(s == -1 for s in got["START"][row][k:])  # padding of a row with fewer answers than the longest


def test_free_ports_are_distinct() -> None:
    # tritonserver exits (printing its usage) when two protocols get one port: ports chosen one at
    # a time can repeat, which failed a full-suite run once
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(1024 <= p <= 65535 for p in ports)


# ---- the server ----------------------------------------------------------------------------------------
def test_health_and_metadata(server: TritonServer, grpc: Any) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{CPU_MODEL}/ready"):
        assert httpx.get(f"http://{server.http_url}{path}", timeout=TIMEOUT_S).status_code == 200, path
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(CPU_MODEL)
    meta = httpx.get(f"http://{server.http_url}/v2/models/{CPU_MODEL}", timeout=TIMEOUT_S).json()
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("QUESTION", "BYTES", (-1, 1)), ("CONTEXT", "BYTES", (-1, 1)), ("TOP_K", "INT32", (-1, 1)),
        ("MAX_ANSWER_LEN", "INT32", (-1, 1)), ("HANDLE_IMPOSSIBLE", "BOOL", (-1, 1))}
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("ANSWER", "BYTES", [-1, -1]), ("SCORE", "FP32", [-1, -1]), ("START", "INT64", [-1, -1]), ("END", "INT64", [-1, -1]),
        ("IMPOSSIBLE", "BOOL", [-1, -1])]
    config = grpc.get_model_config(CPU_MODEL, as_json=True)["config"]
    assert config["backend"] == "python" and config["max_batch_size"] == 16
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000


def test_answers_over_http_and_grpc_equal_the_engines(server: TritonServer, grpc: Any, engine: Engine) -> None:
    want = [engine.answer(q, c, top_k=1) for q, c in PAIRS]
    by_http = http_outputs(http_infer(server, _rows(PAIRS)))  # all pairs in one request: rows of one batch
    by_grpc = grpc_infer(grpc, _rows(PAIRS))
    for i, a in enumerate(want):
        assert isinstance(a, Answer)
        assert_answers(by_http, i, [a])
        assert_answers(by_grpc, i, [a])
        assert_answers(grpc_infer(grpc, _rows([PAIRS[i]])), 0, [a])  # and alone
    assert by_grpc["ANSWER"][2][0].decode() == ANSWER  # in a later window of a long context
    assert by_grpc["END"].shape == (len(PAIRS), 1)


def test_top_k_max_answer_len_and_handle_impossible(server: TritonServer, grpc: Any, engine: Engine) -> None:
    n = len(PAIRS)
    arrays = {**_rows(PAIRS), "TOP_K": np.full((n, 1), 3, np.int32), "MAX_ANSWER_LEN": np.full((n, 1), 5, np.int32),
              "HANDLE_IMPOSSIBLE": np.ones((n, 1), np.bool_)}
    got = grpc_infer(grpc, arrays)
    assert got["ANSWER"].shape == (n, 3)
    for i, (q, c) in enumerate(PAIRS):
        assert_answers(got, i, engine.answer(q, c, top_k=3, max_answer_len=5, handle_impossible=True))  # type: ignore[arg-type]
    # options per row: rows of one request answered with their own options
    mixed = {**_rows(PAIRS[:2]), "TOP_K": np.array([[1], [2]], np.int32), "MAX_ANSWER_LEN": np.array([[30], [3]], np.int32),
             "HANDLE_IMPOSSIBLE": np.array([[False], [True]])}
    got = http_outputs(http_infer(server, mixed))
    assert_answers(got, 0, [engine.answer(*PAIRS[0])])  # type: ignore[list-item]
    assert_answers(got, 1, engine.answer(*PAIRS[1], top_k=2, max_answer_len=3, handle_impossible=True))  # type: ignore[arg-type]


def _bad_requests() -> list[tuple[str, dict[str, Any], str]]:
    q, c = PAIRS[0]
    one = _rows([(q, c)])
    return [
        ("a missing input", {"QUESTION": one["QUESTION"]}, "CONTEXT"),
        ("a wrong dtype", {**one, "TOP_K": np.array([[1.5]], np.float32)}, "FP32"),
        ("a wrong shape", {"QUESTION": one["QUESTION"], "CONTEXT": np.array([[c.encode(), c.encode()]], np.object_)}, "shape"),
        ("an empty batch", {"QUESTION": np.zeros((0, 1), np.object_), "CONTEXT": np.zeros((0, 1), np.object_)}, "got 0"),
        ("a 1 MB context", _rows([(q, "Zanzibar Island. " * 62_000)]), "at most 100000 bytes"),
        ("invalid UTF-8", _rows([(b"Where \xff\xfe?", c.encode())]), "not valid UTF-8"),
        ("rows that disagree", {"QUESTION": one["QUESTION"], "CONTEXT": _rows(PAIRS[:2])["CONTEXT"]}, "batch size does not match"),
        ("an option out of range", {**one, "TOP_K": np.array([[0]], np.int32)}, "top_k must be between 1"),
        ("an empty context", _rows([(q, "   ")]), "is empty or only whitespace"),
    ]


@pytest.mark.parametrize(("case", "arrays", "message"), _bad_requests(), ids=[c for c, _, _ in _bad_requests()])
def test_bad_requests_get_errors_and_the_server_keeps_serving(server: TritonServer, grpc: Any, engine: Engine, case: str,
                                                              arrays: dict[str, Any], message: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(grpc, arrays)
    assert message in str(e.value), str(e.value)
    if case != "invalid UTF-8":  # JSON cannot carry bytes that are not UTF-8
        r = http_infer(server, arrays)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert_answers(grpc_infer(grpc, _rows(PAIRS[:1])), 0, [engine.answer(*PAIRS[0])])  # type: ignore[list-item]
    assert grpc.is_model_ready(CPU_MODEL)


def _metric(server: TritonServer, name: str) -> float:
    text = httpx.get(server.metrics_url, timeout=TIMEOUT_S).text
    m = re.search(rf'^{name}{{model="{CPU_MODEL}",version="1"}} (\S+)$', text, re.M)
    assert m, f"{name} of {CPU_MODEL} not in the metrics:\n{text[:2000]}"
    return float(m.group(1))


def test_16_concurrent_clients_lose_nothing_and_are_batched(server: TritonServer, engine: Engine) -> None:
    clients, per_client = 16, 8
    want = {i: engine.answer(*PAIRS[i % len(PAIRS)]) for i in range(len(PAIRS))}
    requests0, executions0 = _metric(server, "nv_inference_count"), _metric(server, "nv_inference_exec_count")
    start = threading.Barrier(clients)

    def client(k: int) -> list[tuple[int, dict[str, np.ndarray]]]:
        conn = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            start.wait(TIMEOUT_S)
            return [(i % len(PAIRS), grpc_infer(conn, _rows([PAIRS[i % len(PAIRS)]])))
                    for i in range(k, k + per_client)]
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for f in [pool.submit(client, k) for k in range(clients)] for r in f.result(timeout=240)]
    assert len(results) == clients * per_client
    for i, got in results:
        assert_answers(got, 0, [want[i]])  # type: ignore[list-item]
    requests = _metric(server, "nv_inference_count") - requests0
    executions = _metric(server, "nv_inference_exec_count") - executions0
    assert requests == clients * per_client
    assert executions < requests, f"{requests:g} requests in {executions:g} model executions: no batch larger than one"


@pytest.mark.slow
def test_the_default_model_served_by_triton_answers_as_the_engine(tmp_path: Path) -> None:
    from engine.default_model import default_bundle, default_checkpoint_dir
    from engine.errors import BundleError
    from export.squad_data import load_squad

    env = _server_or_skip()
    try:
        default_checkpoint_dir()
    except BundleError as e:
        pytest.skip(f"the default model's weights are not in this checkout: {e}")
    bundle = default_bundle(quiet=True)
    dev = load_squad(Path(__file__).resolve().parents[1] / "bench" / "data" / "squad" / "dev-v1.1.json.gz")[:24]
    pairs = [(e.question, e.context) for e in dev]
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(target="cpu"))
    with Engine(bundle, backend="auto") as eng, start_triton(repo, python_env=env, timeout_s=240) as s:
        client = grpcclient.InferenceServerClient(s.grpc_url)
        got = grpc_infer(client, _rows(pairs))
        client.close()
        want = eng.answer_batch([q for q, _ in pairs], [c for _, c in pairs])
    for i, answers in enumerate(want):
        assert_answers(got, i, answers)


def test_bench_load_triton_phase(tmp_path: Path) -> None:
    """python -m bench load --triton: the Triton phase runs the same clients and questions, and its
    answers equal the BatchingEngine phase's (the lookup model's answers never depend on batch mates)."""
    from bench.load import parse_args, run_load

    env = _server_or_skip()
    bundle = lookup_bundle(tmp_path / "b", **planted("Denver Broncos"), max_seq_len=64)
    argv = ["--model", str(bundle), "--backend", "onnxruntime", "--threads", "1", "--clients", "4", "--requests", "24",
            "--single-requests", "4", "--warmup", "2", "--repeats", "1", "--max-delay-ms", "5", "--cost-questions", "0",
            "--triton"] + (["--triton-python-env", str(env)] if env is not None else [])
    doc = run_load(parse_args(argv))
    phases = [(p["phase"], p["clients"], p["completed"], p["errors"]) for p in doc["phases"]]
    assert phases == [("single", 1, 4, 0), ("triton-single", 1, 4, 0), ("plain", 4, 24, 0), ("batching", 4, 24, 0),
                      ("triton", 4, 24, 0)]
    s = doc["summary"]
    assert s["triton_same_answer_rate"] == 1.0
    assert s["triton_over_batching"] == pytest.approx(s["triton_qps"] / s["batching_qps"])
    assert s["triton_cpu_ms_per_answer"] > 0 and s["triton_p99_ms"] >= s["triton_p50_ms"] > 0
    assert s["triton_single_overhead_ms"] == pytest.approx(s["triton_single_p50_ms"] - s["single_p50_ms"])


def test_python_m_engine_serve_serves_until_terminated(bundle: Path, tmp_path: Path) -> None:
    """The command line: serves the repository on the ports given, and SIGTERM stops the server and
    its stub (they run in their own session, so only the command can stop them)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    env = _server_or_skip()
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(target="cpu"))
    http, grpc_port, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "engine.serve", "--triton", str(repo), "--http-port", str(http), "--grpc-port",
           str(grpc_port), "--metrics-port", str(metrics)] + (["--python-env", str(env)] if env is not None else [])
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # printed once the server is ready
        assert f"HTTP 127.0.0.1:{http}" in line, line + proc.stdout.read().decode()[-3000:]
        server_pid = int(re.search(r"pid (\d+)", line).group(1))  # type: ignore[union-attr]
        family = [server_pid, *(c.pid for c in psutil.Process(server_pid).children(recursive=True))]
        assert len(family) >= 2  # tritonserver and the model's stub
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert grpc_infer(client, _rows(PAIRS[:1]))["ANSWER"][0][0].decode() == ANSWER
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 30
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in family if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
