"""The Triton phase of `python -m bench load`: a real tritonserver serving the bundle as the
BatchingEngine phase is configured, a gRPC caller with one connection per client thread, and the
server's CPU time (its process and its Python-backend stubs)."""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class TritonCaller:
    """``call(question, context)`` against a Triton server over gRPC, one connection per client
    thread (tritonclient's advice); returns an object with the best answer's ``text``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []

    def __call__(self, question: str, context: str) -> Any:
        import tritonclient.grpc as grpcclient

        from export.triton import CPU_MODEL

        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = grpcclient.InferenceServerClient(self.url)
            with self._lock:
                self._connections.append(conn)
        inputs = []
        for name, text in (("QUESTION", question), ("CONTEXT", context)):
            t = grpcclient.InferInput(name, [1, 1], "BYTES")
            t.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=np.object_))
            inputs.append(t)
        result = conn.infer(CPU_MODEL, inputs, client_timeout=120)
        return types.SimpleNamespace(text=result.as_numpy("ANSWER")[0][0].decode("utf-8"))

    def close(self) -> None:
        """Close every connection."""
        for conn in self._connections:
            conn.close()


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (tritonserver and its Python-backend stubs)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@contextlib.contextmanager
def triton_server(args: argparse.Namespace, bundle: Path, max_batch: int) -> Iterator[Any]:
    """A tritonserver on 127.0.0.1 serving ``bundle`` as the BatchingEngine phase is configured."""
    from engine.serve import start_triton
    from export.triton import TritonOptions, write_repository

    with tempfile.TemporaryDirectory(prefix="spanrt-load-triton-") as tmp:
        opts = TritonOptions(target="cpu", backend=args.backend, precision=args.precision, threads=args.threads,
                             max_batch_size=max_batch, max_queue_delay_us=round(args.max_delay_ms * 1000), instances=1)
        repo = write_repository(bundle, Path(tmp) / "repo", opts)
        with start_triton(repo, python_env=args.triton_python_env, timeout_s=600) as server:
            yield server
