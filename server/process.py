"""`epic-rag serve` as a child process on a free loopback port, for the serving benchmark and the
tests that talk to a real server: started, waited on until /health answers, stopped (also when
it fails to come up or the wait is interrupted; use it as a context manager)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """One `epic-rag serve --index INDEX ARGS...` on 127.0.0.1; its output goes to `log` when given
    (quoted when the server fails to come up), else to this process's."""

    def __init__(self, index: str | Path, *args: str, log: Path | None = None, wait_s: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "epic_rag.cli", "serve", "--index", str(index), "--port", str(self.port)]
        output = log.open("w") if log else None
        try:
            self.process = subprocess.Popen(
                [*command, *args], env={**os.environ, **OFFLINE_ENV}, stdout=output, stderr=subprocess.STDOUT
            )
        finally:
            if output:
                output.close()  # the child holds its own descriptor
        try:
            self._wait_healthy(wait_s)
        except BaseException:  # it did not come up, or the wait was interrupted: never leave it running
            self.stop()
            raise

    def _wait_healthy(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"epic-rag serve exited with {self.process.returncode}{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError(f"epic-rag serve did not come up in {wait_s:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        return f":\n{self.log.read_text()[-4000:]}" if self.log and self.log.exists() else ""

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 30 s) and reap the process; a second call does nothing."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
