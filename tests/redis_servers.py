"""Real redis-server processes for the tests: started on free ports, killed at will.

Tests that need Redis use the ``redis_server`` fixture (or :func:`start_cluster`).
Without a ``redis-server`` binary they skip, unless ``RESKIT_REQUIRE_REDIS=1``
(CI sets it), which makes a missing binary a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def require_redis() -> str:
    if REDIS_SERVER is None:
        if os.environ.get("RESKIT_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not on PATH and RESKIT_REQUIRE_REDIS=1")
        pytest.skip("needs a redis-server binary (set RESKIT_REQUIRE_REDIS=1 to require it)")
    return REDIS_SERVER


def free_port(below: int = 65536) -> int:
    """A port nothing listens on now (a cluster node also needs port + 10000 free)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < below:
            return port


def _wait_until_ready(process: subprocess.Popen[bytes], port: int) -> threading.Thread:
    """Block until the server logs that it accepts connections (or exits)."""
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            break
        output.append(line.decode(errors="replace"))
    else:
        process.wait()
        raise RuntimeError(
            f"redis-server on port {port} exited with {process.returncode}:\n{''.join(output)}"
        )
    # Keep reading what it logs, so a full pipe can never block the server.
    drain = threading.Thread(target=process.stdout.read, daemon=True)
    drain.start()
    return drain


class RedisServer:
    """One redis-server process the test controls: kill, restart, pause, resume."""

    def __init__(self, binary: str, port: int | None = None, *extra: str) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="reskit-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._drain = _wait_until_ready(self.process, self.port)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-run, and its data with it (no persistence)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self._drain is not None:
                self._drain.join()  # the pipe reaches its end once the server is gone
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def restart(self) -> None:
        """Start again on the same port: empty, as a server without persistence comes back."""
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> object:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running_redis(*extra: str) -> Iterator[RedisServer]:
    server = RedisServer(require_redis(), None, *extra).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_cluster(nodes: int = 3) -> Iterator[list[RedisServer]]:
    """A real Redis Cluster of ``nodes`` masters, made with ``redis-cli --cluster create``."""
    binary = require_redis()
    if REDIS_CLI is None:
        pytest.fail("redis-cli is needed to create a cluster")
    servers: list[RedisServer] = []
    try:
        for _ in range(nodes):
            server = RedisServer(binary, free_port(below=55_000))
            server.extra = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(Path(server.dir) / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            )
            servers.append(server.start())
        created = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        # redis-cli waits for the nodes to join and checks their slot maps agree
        # before it returns: its report is the signal, nothing to poll.
        if b"All 16384 slots covered" not in created.stdout:
            pytest.fail(f"the test cluster was not created:\n{created.stdout.decode()}")
        yield servers
    finally:
        for server in servers:
            server.stop()
