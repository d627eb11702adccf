"""Real servers for the tests, on 127.0.0.1 and free ports: Redis, nginx, `epic-rag serve`.

A server binary that is missing fails the test that needs it (`.ci/run` installs them);
nothing is faked or skipped. Each server is a context manager, and stops itself when it fails
to come up, so a fixture that starts several in an `ExitStack` leaves none running whatever
fails (no process outlives pytest).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Self

import httpx
import pytest
import redis
from epic_rag.server.process import OFFLINE_ENV, ServeProcess, free_port
from prometheus_client.parser import text_string_to_metric_families

ENV = {**os.environ, **OFFLINE_ENV}


def binary(name: str) -> str:
    """The path of a server binary; fails the test (never skips) when it is not installed."""
    for folder in ("", "/usr/sbin/", "/usr/bin/"):
        path = shutil.which(folder + name) if folder else shutil.which(name)
        if path:
            return path
    pytest.fail(f"{name} is not installed: `apt-get install {name}` (.ci/run installs it)")


class LiveServer(ABC):
    """A server process the test started: `with` stops it, whatever happens inside."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the process and reap it; a second call does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop(process: subprocess.Popen, wait_s: float = 20) -> None:
    """Terminate `process` (SIGKILL if it lingers past `wait_s`) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RedisServer(LiveServer):
    """redis-server on 127.0.0.1, no automatic snapshots; can be stopped and started on the same port
    (empty, or with its data when stopped with `save`)."""

    def __init__(self, folder: Path, password: str | None = None, maxmemory: str | None = None) -> None:
        self.folder, self.password, self.maxmemory = folder, password, maxmemory
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> None:
        command = [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        command += ["--appendonly", "no", "--dir", str(self.folder)]
        if self.password:
            command += ["--requirepass", self.password]
        if self.maxmemory:
            command += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            _wait_until(lambda: self.client().ping(), redis.ConnectionError, self.process, "redis-server", 20)
        except BaseException:
            self.stop()
            raise

    def stop(self, save: bool = False) -> None:
        """Stop the server; with `save`, write its data first so that `start` brings it back."""
        if self.process is not None:
            if save:
                self.client().shutdown(save=True)
            _stop(self.process)
            self.process = None


def epic_server(index: Path, *args: str) -> ServeProcess:
    """`epic-rag serve` for a test, its output in a log file beside the index (quoted if it fails)."""
    log = Path(index).parent / f"serve-{Path(index).name}-{time.monotonic_ns()}.log"
    return ServeProcess(index, *args, log=log, wait_s=300)


class Nginx(LiveServer):
    """nginx running deploy/nginx.conf with its upstream pointed at loopback replicas."""

    def __init__(self, folder: Path, config: Path, upstreams: list[int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        text = config.read_text()
        for name, port in zip(("replica-a:8000", "replica-b:8000"), upstreams, strict=True):
            assert name in text, f"{config} has no upstream {name}"
            text = text.replace(name, f"127.0.0.1:{port}")
        assert "listen 8080;" in text, f"{config} does not listen on 8080"
        text = text.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        local = f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
        temp = "".join(f"    {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi"))
        temp += f"    uwsgi_temp_path {folder}/uwsgi;\n    scgi_temp_path {folder}/scgi;\n    access_log off;\n"
        text = local + text.replace("http {\n", "http {\n" + temp, 1)
        (folder / "nginx.conf").write_text(text)
        self.process = subprocess.Popen(
            [binary("nginx"), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            _wait_until(self._connect, OSError, self.process, "nginx", 20)
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> None:
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()

    def stop(self) -> None:
        _stop(self.process)


class ChromaServer(LiveServer):
    """A Chroma server (`chroma run`, installed with the chroma extra) on 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        chroma = Path(sys.executable).with_name("chroma")
        if not chroma.is_file():
            pytest.fail(f"{chroma} is missing: pip install -e '.[chroma]' (the test extra includes it)")
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.command = [str(chroma), "run", "--host", "127.0.0.1", "--port", str(self.port), "--path", str(folder)]
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            _wait_until(self._heartbeat, httpx.HTTPError, self.process, "chroma", 60)
        except BaseException:
            self.stop()
            raise

    def _heartbeat(self) -> None:
        httpx.get(f"{self.url}/api/v2/heartbeat", timeout=2).raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, wait_s=30)
            self.process = None


def _wait_until(
    ready: Callable[[], object], not_yet: type[Exception] | tuple, process: subprocess.Popen, name: str, wait_s: float
) -> None:
    """Call `ready` until it stops raising `not_yet`; fail if `process` exits or `wait_s` passes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"{name} exited with {process.returncode} before it answered {output}".rstrip())
        try:
            ready()
            return
        except not_yet:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer within {wait_s:.0f} s")


def metrics(url: str) -> dict[str, float]:
    """Every sample a server's /metrics exports, keyed as Prometheus writes it: `name{label="value"}`."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples
