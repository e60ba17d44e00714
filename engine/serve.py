"""Serve a Triton model repository with the tritonserver of the ``nvidia-pytriton`` wheel.

``python -m engine.serve --triton REPO`` starts a real Triton Inference Server (HTTP, gRPC and
metrics endpoints) on a repository written by ``python -m export triton --target cpu``, and stops it
on Ctrl-C. ``start_triton`` does the same from Python (tests, ``python -m bench load --triton``).

What the wheel needs, found out on this project's machines:

* The Python-backend stub embeds libpython: it must load the libpython of the interpreter whose
  packages it imports, so that interpreter's library folder goes on LD_LIBRARY_PATH (otherwise it
  runs the system's libpython with another Python's standard library and fails). The stub for
  that interpreter's version is copied into a private backend folder, as pytriton itself does.
* The stub of nvidia-pytriton 0.7.0 (Triton 2.51) was built with a pybind11 older than NumPy 2
  support (it imports ``numpy.core.multiarray``). Under NumPy 2 every tensor it converts comes out
  as copies of its first element, as an array with zero strides would (it reads ``PyArray_Descr``
  at its NumPy 1 layout): a TYPE_STRING input becomes one repeated byte, the low byte of the first
  string's length, and ``deserialize_bytes_tensor`` fails. HTTP and gRPC alike; the wheel itself
  requires numpy<2. So the stub runs in a Python environment with NumPy < 2:
  ``python -m engine.serve --make-python-env DIR`` makes one (a venv with NumPy 1.26 that sees
  this environment's packages and SpanRT), and ``export triton --python-env DIR`` or
  ``start_triton(python_env=DIR)`` use it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import BackendUnavailableError

DEFAULT_ENV_NAME = "spanrt-triton-env"  # under sys.prefix: where --make-python-env puts the stub's Python by default
ENV_VARIABLE = "SPANRT_TRITON_PYTHON_ENV"
NUMPY_FOR_STUB = "numpy>=1.24,<2"


@dataclass(frozen=True)
class TritonDistribution:
    """The tritonserver binary, its backends and libraries, as the nvidia-pytriton wheel lays them out."""

    server: Path
    backends: Path
    stubs: Path
    libs: Path


def find_tritonserver() -> TritonDistribution:
    """The wheel's tritonserver (without importing pytriton, whose client needs gevent); an error
    that says what to install when it is missing or cannot run on this platform."""
    import importlib.util
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise BackendUnavailableError(f"the nvidia-pytriton wheel's tritonserver runs on x86-64 Linux only, not "
                                      f"{sys.platform} {platform.machine()}")
    libc, version = platform.libc_ver()
    if libc == "glibc" and tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        raise BackendUnavailableError(f"the nvidia-pytriton wheel's tritonserver needs glibc >= 2.35, this system has {version}")
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError('tritonserver not found: pip install --no-deps "nvidia-pytriton==0.7.0" (its numpy<2 '
                                      "pin would downgrade NumPy; the server needs none of its Python dependencies)")
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = TritonDistribution(root / "tritonserver" / "bin" / "tritonserver", root / "tritonserver" / "backends",
                              root / "tritonserver" / "python_backend_stubs", root.parent / "nvidia_pytriton.libs")
    if not dist.server.is_file():
        raise BackendUnavailableError(f"{dist.server} is missing: reinstall nvidia-pytriton")
    return dist


def default_python_env() -> Path | None:
    """$SPANRT_TRITON_PYTHON_ENV, else sys.prefix/spanrt-triton-env when it exists, else None."""
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE])
    here = Path(sys.prefix) / DEFAULT_ENV_NAME
    return here if here.is_dir() else None


def _python_facts(python: Path) -> dict[str, str]:
    code = ("import sys, sysconfig; import numpy; print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
            "print(sysconfig.get_config_var('LIBDIR')); print(numpy.__version__)")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise BackendUnavailableError(f"{python} cannot run the Triton stub's checks: {r.stderr.strip()[-500:]}")
    version, libdir, numpy_version = r.stdout.split()
    return {"version": version, "libdir": libdir, "numpy": numpy_version}


def check_python_env(env: Path | None) -> dict[str, str]:
    """The stub's Python (``env``'s bin/python, else this interpreter): its version, library folder
    and NumPy, which must be < 2 (see the module docstring)."""
    python = Path(sys.executable) if env is None else Path(env) / "bin" / "python"
    if not python.exists():
        raise BackendUnavailableError(f"{python} does not exist: make the environment with "
                                      f"python -m engine.serve --make-python-env {env}")
    facts = _python_facts(python)
    if int(facts["numpy"].split(".")[0]) >= 2:
        raise BackendUnavailableError(
            f"{python} has NumPy {facts['numpy']}; the Triton Python-backend stub of nvidia-pytriton 0.7.0 corrupts every "
            "tensor under NumPy 2. Make a stub environment with NumPy < 2: python -m engine.serve --make-python-env DIR, "
            "then pass it (start_triton(python_env=DIR), --python-env DIR, or $SPANRT_TRITON_PYTHON_ENV)")
    return facts


def make_python_env(target: Path) -> Path:
    """A venv for the Triton stub: NumPy < 2 (installed with pip from the package index), then, through a
    .pth file, SpanRT's source folder and this environment's site-packages (tokenizers, onnxruntime, ...)."""
    import venv

    import engine

    target = Path(target).resolve()
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another folder")
    venv.EnvBuilder(with_pip=True, symlinks=True).create(target)
    python = target / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", NUMPY_FOR_STUB], check=True)
    site_dir = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # Listed after the venv's own site-packages, so its NumPy 1.x shadows this environment's NumPy 2:
    # SpanRT's source folder, then every folder of this interpreter's path outside its base installation.
    source = str(Path(engine.__file__).resolve().parent.parent)
    base = Path(sys.base_prefix).resolve()
    ours = [p for p in sys.path if p and Path(p).is_dir() and base not in Path(p).resolve().parents and p != source]
    lines = [source, *dict.fromkeys(ours)]
    (site_dir / "zz-spanrt-parent-env.pth").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    check_python_env(target)
    return target


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different TCP ports nobody listens on right now (the caller binds them soon; a lost
    race is retried). All are held open while chosen: ports taken one at a time can repeat, and
    tritonserver refuses one port for two protocols."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


@dataclass
class TritonServer:
    """A running tritonserver process (its own process group) and its endpoints."""

    process: subprocess.Popen[bytes]
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    workdir: Path
    shm_prefix: str
    _stopped: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str:
        """host:port of the HTTP/REST endpoint."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM to the server's process group (server and stubs), SIGKILL after ``timeout_s``;
        removes its shared-memory regions and work folder. Returns the server's exit status."""
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # stubs that outlived the server
            os.killpg(self.process.pid, signal.SIGKILL)
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _backend_folder(dist: TritonDistribution, version: str, workdir: Path) -> Path:
    """backends/python with the stub of this Python version beside the backend library (links, no copies)."""
    stub = dist.stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in dist.stubs.iterdir())
        raise BackendUnavailableError(f"nvidia-pytriton has no Python-backend stub for Python {version} (has {', '.join(have)})")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True)
    for item in (dist.backends / "python").iterdir():
        (python / item.name).symlink_to(item)
    shutil.copy(stub, python / "triton_python_backend_stub")  # the backend runs it from its own folder
    return workdir / "backends"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is ours: never through a proxy


def _ready(host: str, port: int) -> bool:
    try:
        with _NO_PROXY.open(f"http://{host}:{port}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_triton(repository: str | os.PathLike[str], *, python_env: str | os.PathLike[str] | None = None,
                 host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 timeout_s: float = 180.0, extra_args: tuple[str, ...] = (), attempts: int = 3) -> TritonServer:
    """Start tritonserver on ``repository``, bound to ``host`` (ports 0: free ones, a lost race retried
    up to ``attempts`` times), and wait until it reports ready. ``python_env``: the stub's Python (see
    the module docstring); None: ``default_python_env()``, else this interpreter."""
    dist = find_tritonserver()
    env_dir = Path(python_env) if python_env is not None else default_python_env()
    facts = check_python_env(env_dir)
    repository = Path(repository).resolve()
    for attempt in range(attempts):
        chosen = iter(free_ports(3, host))
        ports = [p or next(chosen) for p in (http_port, grpc_port, metrics_port)]
        workdir = Path(tempfile.mkdtemp(prefix="spanrt-triton-"))
        shm_prefix = f"spanrt_triton_{os.getpid()}_{secrets.token_hex(4)}_"
        backends = _backend_folder(dist, facts["version"], workdir)
        cmd = [str(dist.server), f"--model-repository={repository}", f"--backend-directory={backends}",
               f"--http-address={host}", f"--grpc-address={host}", f"--metrics-address={host}",
               f"--http-port={ports[0]}", f"--grpc-port={ports[1]}", f"--metrics-port={ports[2]}",
               "--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}", *extra_args]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (facts["libdir"], str(dist.libs), env.get("LD_LIBRARY_PATH")) if p)
        # The stub finds its Python (prefix, site-packages) through PATH, as pytriton arranges it.
        bin_dir = Path(env_dir).resolve() / "bin" if env_dir is not None else Path(sys.executable).parent
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        log_path = workdir / "tritonserver.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True, cwd=workdir)
        server = TritonServer(process, host, *ports, log_path=log_path, workdir=workdir, shm_prefix=shm_prefix)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None and not _ready(host, ports[0]):
            time.sleep(0.2)
        if process.poll() is None and _ready(host, ports[0]):
            return server
        text = server.log()
        server.stop()
        if "already in use" in text and attempt + 1 < attempts and not (http_port or grpc_port or metrics_port):
            continue
        state = f"exited with status {process.returncode}" if process.returncode is not None else f"not ready after {timeout_s:g} s"
        shown = text if len(text) <= 6000 else f"{text[:2000]}\n[...]\n{text[-4000:]}"
        raise BackendUnavailableError(f"tritonserver {state}; command: {' '.join(cmd)}\nits log:\n{shown}")
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.serve --triton REPO`` (serve until Ctrl-C) or ``--make-python-env DIR``."""
    p = argparse.ArgumentParser(prog="python -m engine.serve",
                                description="Serve a Triton model repository (python -m export triton --target cpu) with the "
                                            "tritonserver of the nvidia-pytriton wheel.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--triton", metavar="REPO", type=Path, help="the model repository to serve")
    what.add_argument("--make-python-env", metavar="DIR", type=Path, nargs="?", const=Path(sys.prefix) / DEFAULT_ENV_NAME,
                      help=f"make the stub's Python environment (NumPy < 2; default {Path(sys.prefix) / DEFAULT_ENV_NAME})")
    p.add_argument("--python-env", type=Path, default=None, help=f"the stub's Python (default ${ENV_VARIABLE}, else "
                   f"sys.prefix/{DEFAULT_ENV_NAME})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 to serve other hosts)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    a = p.parse_args(argv)
    if a.make_python_env is not None:
        print(make_python_env(a.make_python_env))
        return 0
    def stop_serving(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the server runs in its own session: stop it here, whatever stops us

    signal.signal(signal.SIGINT, stop_serving)  # also where a background shell set SIGINT to be ignored
    signal.signal(signal.SIGTERM, stop_serving)
    server = start_triton(a.triton, python_env=a.python_env, host=a.host, http_port=a.http_port, grpc_port=a.grpc_port,
                          metrics_port=a.metrics_port)
    print(f"tritonserver (pid {server.process.pid}) serving {a.triton}: HTTP {server.http_url}, gRPC {server.grpc_url}, "
          f"metrics {server.metrics_url}; Ctrl-C stops it", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
