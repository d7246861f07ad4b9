"""A real `mlflow server` on 127.0.0.1 for tests (sqlite backend; artifacts in a directory or a bucket)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server --backend-store-uri sqlite:///<dir>/srv.db`` with ``--artifacts-destination`` (proxied
    artifacts: clients upload through the server, which alone needs the bucket's credentials)."""

    def __init__(self, workdir: Path, artifacts: str | None = None, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.artifacts = artifacts or str(self.workdir / "artifacts")
        self.extra_env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **self.extra_env)
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log_path = self.workdir / "mlflow-server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.workdir / 'srv.db'}",
             "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.workdir, env=env, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")
            time.sleep(0.5)

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        # the server and its uvicorn worker share the process group started above
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
