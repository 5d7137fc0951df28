"""The ``tritonserver`` that the ``nvidia-pytriton`` wheel bundles, run on a model repository.

The wheel holds the server binary, its Python backend and one backend stub per Python version;
this module lays out a backend directory for the running Python (links, no copies), gives the
server the environment its stub needs, starts it on loopback ports, waits until every model is
ready and stops it. The stub embeds Python: it finds the environment through ``PATH`` (this
interpreter's ``bin`` first, as PyTriton does) and must load the same ``libpython`` as this
interpreter, so this interpreter's library folder leads ``LD_LIBRARY_PATH`` (a system
``libpython3.X`` of another patch release breaks the stub's ``multiprocessing``).
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from densert.errors import DensertError, MissingExtraError

from .repo import SOURCE_ENV

PYTRITON_VERSION = "0.7.0"
# nvidia-pytriton's metadata pins numpy<2 for its in-process proxy, which densert does not use;
# densert's numpy 2 (and OpenCV's) cannot meet it, so the wheel goes in without its dependencies
# (the ones densert needs are the serve extra).
INSTALL_HINT = ("pip install 'densert[serve]' && pip install --no-deps "
                f"nvidia-pytriton=={PYTRITON_VERSION}")
STARTUP_TIMEOUT_S = 180.0


class ServerError(DensertError):
    exit_code = 1


def pytriton_dir() -> Path:
    """The installed ``pytriton`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("densert serve runs the tritonserver bundled in the "
                                f"nvidia-pytriton wheel, which is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def binary() -> Path:
    p = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not p.is_file():
        raise ServerError(f"{p}: no tritonserver binary in this nvidia-pytriton install; "
                          f"reinstall it: {INSTALL_HINT}")
    return p


def _libs() -> Path:
    return pytriton_dir().parent / "nvidia_pytriton.libs"


def stub() -> Path:
    """The Python-backend stub built for this interpreter's Python version."""
    stubs = pytriton_dir() / "tritonserver" / "python_backend_stubs"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    p = stubs / ver / "triton_python_backend_stub"
    if not p.is_file():
        have = sorted(d.name for d in stubs.iterdir()) if stubs.is_dir() else []
        raise ServerError(f"nvidia-pytriton {PYTRITON_VERSION} has no Python-backend stub for "
                          f"Python {ver} (it has {', '.join(have) or 'none'})")
    return p


def backend_dir(where: Path) -> Path:
    """``where/backends`` with ``python/`` = the bundled Python backend and this Python's stub."""
    src = pytriton_dir() / "tritonserver" / "backends" / "python"
    dst = where / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    links = {f.name: f for f in src.iterdir() if f.is_file()}
    links["triton_python_backend_stub"] = stub()
    for name, target in links.items():
        link = dst / name
        if not link.exists():
            link.symlink_to(target)
    return where / "backends"


def _densert_source() -> str:
    import densert
    return str(Path(densert.__file__).resolve().parent.parent)


def environment(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    ld = [p for p in (libdir, str(_libs()), env.get("LD_LIBRARY_PATH")) if p]
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    env["PATH"] = os.pathsep.join([str(Path(sys.exec_prefix) / "bin"), env.get("PATH", "")])
    env[SOURCE_ENV] = _densert_source()
    return env


def command(repo, backends, host: str, http_port: int, grpc_port: int, metrics_port: int,
            exit_timeout_s: int = 10) -> list[str]:
    """The server's command line (every flag explicit, so it can be copied)."""
    return [str(binary()), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-address={host}", f"--http-port={http_port}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false",
            f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            # no CUDA here: no pinned host pool to try for
            "--pinned-memory-pool-byte-size=0",
            "--strict-readiness=true", f"--exit-timeout-secs={exit_timeout_s}"]


class TritonServer:
    """The bundled ``tritonserver`` on ``repo``; ``with TritonServer(...) as s:`` starts it,
    waits until every model is ready, and stops it on exit."""

    def __init__(self, repo, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log_file=None,
                 startup_timeout_s: float = STARTUP_TIMEOUT_S):
        self.repo = Path(repo)
        self.host, self.http_port, self.grpc_port, self.metrics_port = \
            host, http_port, grpc_port, metrics_port
        self.startup_timeout_s = startup_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="densert-triton-")
        self.log_file = Path(log_file) if log_file else Path(self._tmp.name) / "tritonserver.log"
        self.proc: subprocess.Popen | None = None
        self.cmd: list[str] = []

    @property
    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self._probe_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._probe_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._probe_host}:{self.metrics_port}/metrics"

    def start(self) -> "TritonServer":
        if not self.repo.is_dir():
            raise ServerError(f"model repository {self.repo}: not a folder")
        self.cmd = command(self.repo.resolve(), backend_dir(Path(self._tmp.name)), self.host,
                           self.http_port, self.grpc_port, self.metrics_port)
        self._log = open(self.log_file, "ab")
        env = environment()
        # the command as it can be rerun by hand, first in the log
        shown = [f"{k}={shlex.quote(env[k])}" for k in ("LD_LIBRARY_PATH", "PATH", SOURCE_ENV)]
        self._log.write(("# densert: " + " ".join(shown + [shlex.quote(c) for c in self.cmd])
                         + "\n").encode())
        self._log.flush()
        # its own session: a Ctrl-C in the terminal reaches densert, which stops the server
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> "TritonServer":
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited ({self.proc.returncode}) while starting; "
                                  f"its log ({self.log_file}) ends:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s; its "
                          f"log ends:\n{tail}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (Triton unloads the models and stops their stubs), SIGKILL after
        ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # the server and its stubs
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
