"""The measurement schedule: one worker process per system, loaded one at a time, then interleaved repeats.

Order of work (each step timed only inside the worker doing it, while every other worker waits idle):
load + cold start of each system in turn, its warm-up, then ``repeats`` rounds; in each round every
batch size, and for each batch size every system answers the whole sample (the order of systems
rotates between rounds so no system always runs first or last). All raw timings come back.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.base import Artifacts
from bench.systems import QASettings, SystemSpec
from bench.worker import serve

RECV_POLL_S = 1.0


class WorkerDied(RuntimeError):
    """The worker process ended without answering (crash, killed for memory...)."""


@dataclass
class SystemRun:
    """Everything measured for one system (raw), plus its status."""

    spec: SystemSpec
    status: str = "pending"  # pending | ok | unavailable | failed
    reason: str | None = None
    traceback: str | None = None
    artifacts: Artifacts | None = None
    loaded: dict[str, Any] = field(default_factory=dict)
    closed: dict[str, Any] = field(default_factory=dict)
    warmup_s: float = 0.0
    batch_sizes: list[int] | None = None  # the batch sizes this system answers at (None: every one of the run)
    passes: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # batch size -> one pass per repeat


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, run: SystemRun, settings: QASettings, threads: int, max_batch_size: int,
                 questions: list[str], contexts: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, name=f"bench-{run.spec.name}", daemon=True,
                                   args=(child, run.spec.name, run.artifacts, settings, threads, max_batch_size, questions, contexts))
        self.process.start()
        child.close()

    def recv(self, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """The next non-progress message; progress messages go to ``on_progress``."""
        while True:
            if self.conn.poll(RECV_POLL_S):
                try:
                    msg = self.conn.recv()
                except EOFError as exc:
                    raise WorkerDied(f"worker exited with code {self.process.exitcode}") from exc
                if msg["op"] == "progress":
                    if on_progress is not None:
                        on_progress(msg["done"])
                    continue
                return msg
            if not self.process.is_alive():
                raise WorkerDied(f"worker exited with code {self.process.exitcode} (killed for memory? crashed?)")

    def send(self, msg: dict[str, Any]) -> None:
        """Send one request to the worker."""
        self.conn.send(msg)

    def stop(self) -> None:
        """Ask the worker to close (if alive), then wait for it."""
        if self.process.is_alive():
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        self.conn.close()


class Progress:
    """One progress bar per system on a terminal (tqdm); elsewhere one log line per phase of each system."""

    def __init__(self, runs: list[SystemRun], totals: dict[str, int], enabled: bool, log: Callable[[str], None]) -> None:
        self.bars: dict[str, Any] = {}
        self.totals = totals
        self.log = log
        self.notes: dict[str, str] = {}
        if not enabled:
            return
        from tqdm import tqdm

        width = max(len(r.spec.name) for r in runs)
        for i, r in enumerate(runs):
            self.bars[r.spec.name] = tqdm(total=totals.get(r.spec.name, 0), desc=r.spec.name.ljust(width), position=i,
                                          unit="q", leave=True, dynamic_ncols=True, mininterval=0.3)

    def set(self, name: str, value: int, note: str | None = None) -> None:
        """Move ``name``'s bar to ``value`` questions done, with an optional phase note."""
        bar = self.bars.get(name)
        if bar is None:
            if note is not None and note != self.notes.get(name):
                self.notes[name] = note
                self.log(f"bench: {name}: {note} ({value}/{self.totals.get(name, 0)} questions)")
            return
        bar.n = value
        if note is not None:
            bar.set_postfix_str(note, refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Finish every bar."""
        for bar in self.bars.values():
            bar.close()


def measure(runs: list[SystemRun], settings: QASettings, *, questions: list[str], contexts: list[str], batch_sizes: list[int],
            repeats: int, warmup_calls: int, threads: int, progress: bool, log: Callable[[str], None]) -> None:
    """Fill every ready run (status "pending" with artifacts) with its raw measurements, in place."""
    n = len(questions)
    indices = list(range(n))
    max_bs = max(batch_sizes)
    warm_indices = {b: [i % n for i in range(b * warmup_calls)] for b in batch_sizes}
    ready = [r for r in runs if r.status == "pending"]
    sizes = {r.spec.name: [b for b in batch_sizes if r.batch_sizes is None or b in r.batch_sizes] for r in ready}
    totals = {r.spec.name: sum(len(warm_indices[b]) + repeats * n for b in sizes[r.spec.name]) for r in ready}
    done = dict.fromkeys(totals, 0)
    bars = Progress(ready, totals, progress, log)
    workers: dict[str, Worker] = {}

    def fail(run: SystemRun, error: str, tb: str | None = None) -> None:
        run.status, run.reason, run.traceback = "failed", error, tb
        bars.set(run.spec.name, done[run.spec.name], "FAILED")
        log(f"{run.spec.name}: FAILED: {error}")
        w = workers.pop(run.spec.name, None)
        if w is not None:
            w.stop()

    def tick(name: str, base: int) -> Callable[[int], None]:
        return lambda k: bars.set(name, base + k)

    def do_pass(run: SystemRun, batch_size: int, idx: list[int]) -> dict[str, Any] | None:
        name = run.spec.name
        w = workers[name]
        try:
            w.send({"op": "pass", "batch_size": batch_size, "indices": idx})
            msg = w.recv(tick(name, done[name]))
        except (WorkerDied, OSError) as exc:
            fail(run, str(exc))
            return None
        if msg["op"] == "failed":
            fail(run, msg["error"], msg.get("traceback"))
            return None
        done[name] += len(idx)
        bars.set(name, done[name])
        return msg

    try:
        # 1. load each system alone (cold start), then warm it up
        for run in ready:
            name = run.spec.name
            bars.set(name, 0, "loading")
            w = Worker(run, settings, threads, max_bs, questions, contexts)
            workers[name] = w
            try:
                msg = w.recv()
            except WorkerDied as exc:
                fail(run, str(exc))
                continue
            if msg["op"] == "unavailable":
                run.status, run.reason = "unavailable", msg["reason"]
                bars.set(name, 0, "unavailable")
                workers.pop(name).stop()
                continue
            if msg["op"] == "failed":
                fail(run, msg["error"], msg.get("traceback"))
                continue
            run.loaded = msg
            run.status = "ok"
            bars.set(name, 0, "warm-up")
            t = time.perf_counter()
            for b in sizes[name]:
                if do_pass(run, b, warm_indices[b]) is None:
                    break
            run.warmup_s = time.perf_counter() - t
        # 2. interleaved repeats
        for rep in range(repeats):
            for b in batch_sizes:
                order = [r for r in ready if r.status == "ok" and b in sizes[r.spec.name]]
                if not order:
                    break
                k = rep % len(order)
                for run in order[k:] + order[:k]:
                    if run.status != "ok":
                        continue
                    bars.set(run.spec.name, done[run.spec.name], f"repeat {rep + 1}/{repeats}, batch {b}")
                    msg = do_pass(run, b, indices)
                    if msg is not None:
                        run.passes.setdefault(b, []).append(msg)
        # 3. peak memory, then close
        for run in ready:
            w = workers.pop(run.spec.name, None)
            if w is None:
                continue
            try:
                w.send({"op": "close"})
                msg = w.recv()
                if msg["op"] == "closed":
                    run.closed = msg
                    bars.set(run.spec.name, done[run.spec.name], "done")
                else:
                    fail(run, msg.get("error", str(msg)), msg.get("traceback"))
            except (WorkerDied, OSError) as exc:
                fail(run, str(exc))
            finally:
                w.stop()
    finally:
        for w in workers.values():
            w.stop()
        bars.close()
