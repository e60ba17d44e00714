"""The base of the ONNX Runtime backends whose logits come back to host memory (the CPU provider,
OpenVINO), safe after ``fork()`` (no backend owns this)."""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from engine.backends.base import Consume, CPUBackend, T
from engine.errors import BackendUnavailableError

_fork_lock = threading.Lock()
_open_backends: weakref.WeakSet[HostSessionBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # the parent's may have been held by a thread that does not exist here
    for backend in list(_open_backends):  # inherited sessions: never destroyed here, even if never used
        _keep_forever(backend._session)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _keep_forever(obj: Any) -> None:
    """Never destroy ``obj`` in this process: a session inherited through fork() owns threads and
    locks of the parent (its thread pool may have been inside ``run``); destroying it would join
    threads that do not exist here. One leaked reference per forked Engine, released at exit."""
    if obj is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class HostSessionBackend(CPUBackend):
    """An ONNX Runtime session whose logits come back to host memory (the CPU-side providers).

    Safe after ``fork()``: ONNX Runtime's thread pool does not survive a fork (a child forked while
    another thread was inside ``run`` could hang in its next call), so the first ``run`` in a new
    process opens the session again (``_reopen``), as the native backend rebuilds its thread team;
    the inherited session is never touched again. A subclass without ``_reopen`` refuses to run
    in a forked child with a BackendUnavailableError."""

    _session: Any = None
    _pid: int = -1
    _reopen: Callable[[], Any] | None = None  # opens this backend's session again (after a fork)
    _outputs = ["start_logits", "end_logits"]

    @property
    def session(self) -> Any:
        """The InferenceSession of this process."""
        return self._session

    @session.setter
    def session(self, value: Any) -> None:
        self._session = value
        self._pid = os.getpid()
        _open_backends.add(self)

    def run(self, feeds: Mapping[str, np.ndarray], consume: Consume[T]) -> T:
        """Run the session (thread-safe in ONNX Runtime) and pass the host logits on."""
        if self._pid != os.getpid() and self._session is not None:
            self._reopen_after_fork()
        start, end = self._session.run(self._outputs, dict(feeds))
        return consume(start, end, None)

    def _reopen_after_fork(self) -> None:
        with _fork_lock:
            if self._pid == os.getpid():  # another thread of this child reopened it
                return
            self._session = None  # the inherited one was kept alive at the fork (_after_fork_in_child)
            if self._reopen is None:
                raise BackendUnavailableError(
                    f"backend {self.name!r} was opened in another process and cannot run in this forked child; create the "
                    "Engine after the fork (gunicorn: without --preload, or in a post_fork hook)")
            self.session = self._reopen()

    def close(self) -> None:
        """Drop the session (in a forked child, the inherited one stays alive, never destroyed)."""
        self._session = None
