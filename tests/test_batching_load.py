"""bench/load.py, the closed-loop load generator: bounded by count and by time, every client one
call at a time, figures computed from what happened; and a whole run on a lookup bundle."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from runtime_helpers import lookup_bundle, planted

from bench.load import closed_loop, parse_args, percentiles, run_load


class SlowEcho:
    """A stand-in engine: answers after ``delay`` seconds and records the concurrency it saw."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.calls = 0

    def __call__(self, question: str, context: str) -> SimpleNamespace:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return SimpleNamespace(text=question.upper())


def test_closed_loop_stops_at_the_request_count_with_one_call_per_client() -> None:
    echo = SlowEcho(0.01)
    pairs = [(f"q{i}", "c") for i in range(7)]
    r = closed_loop(echo, pairs, clients=4, requests=40, duration=30)
    assert r["completed"] == echo.calls == 40
    assert echo.most == 4  # four clients, each with one call in flight
    assert r["answers"][9] == "Q2"  # question index 9 cycles to pair 2
    assert r["errors"] == 0 and r["p50_ms"] >= 10


def test_closed_loop_stops_at_the_deadline() -> None:
    echo = SlowEcho(0.05)
    t0 = time.perf_counter()
    r = closed_loop(echo, [("q", "c")], clients=2, requests=10_000, duration=0.3)
    assert time.perf_counter() - t0 < 2.0
    assert 2 <= r["completed"] < 40


def test_errors_are_counted_not_timed() -> None:
    def odd_fails(question: str, context: str) -> SimpleNamespace:
        if int(question) % 2:
            raise ValueError("no")
        return SimpleNamespace(text=question)

    r = closed_loop(odd_fails, [(str(i), "c") for i in range(10)], clients=2, requests=10, duration=5)
    assert (r["completed"], r["errors"], r["first_errors"][0]) == (5, 5, "ValueError: no")
    with pytest.raises(RuntimeError, match="no call of this phase succeeded"):
        closed_loop(odd_fails, [("1", "c")], clients=2, requests=3, duration=5)
    with pytest.raises(ValueError, match="no call finished"):
        percentiles([])


def test_percentiles_in_milliseconds() -> None:
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p["p50_ms"] == pytest.approx(50.5) and p["max_ms"] == pytest.approx(100.0)


def test_a_whole_run_on_a_lookup_bundle(tmp_path: Path) -> None:
    bundle = lookup_bundle(tmp_path / "b", **planted("Denver Broncos"), max_seq_len=64)
    args = parse_args(["--model", str(bundle), "--backend", "onnxruntime", "--threads", "1", "--clients", "4",
                       "--requests", "24", "--single-requests", "4", "--warmup", "2", "--repeats", "1",
                       "--max-delay-ms", "5", "--cost-questions", "8"])
    doc = run_load(args)
    phases = [(p["phase"], p["clients"], p["completed"]) for p in doc["phases"]]
    assert phases == [("single", 1, 4), ("plain", 4, 24), ("batching", 4, 24)]
    s = doc["summary"]
    assert s["same_answer_rate"] == 1.0  # the lookup model's answers do not depend on batching
    assert s["mean_batch"] > 1.0
    assert s["speedup"] == pytest.approx(s["batching_qps"] / s["plain_qps"])
    assert doc["settings"]["max_batch_size"] == 4
    cost = doc["cpu_cost"]
    assert (cost["questions"], cost["batch"]) == (8, 4) and cost["batch1_cpu_ms_per_answer"] > 0
