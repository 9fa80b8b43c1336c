"""The operations endpoint of a worker: /metrics, /healthz and /readyz on one small HTTP port.

A worker passes its own Prometheus registry and a readiness callback that reports each
dependency; /readyz answers 200 only when all of them are ready. `TaskSupervisor` watches a
service's long-running tasks: one that ends before the service was asked to stop turns /readyz
red and stops the service, which then exits non-zero so its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

Readiness = Callable[[], Mapping[str, bool]]
_MAX_REQUEST_LINE = 4096


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def render(path: str, registry: CollectorRegistry, readiness: Readiness) -> bytes:
    """The HTTP response for a GET of `path`."""
    if path == "/metrics":
        return _response("200 OK", CONTENT_TYPE_LATEST, generate_latest(registry))
    if path == "/healthz":
        return _response("200 OK", "application/json", b'{"status":"ok"}')
    if path == "/readyz":
        checks = dict(readiness())
        ready = all(checks.values())
        body = orjson.dumps({"ready": ready, "checks": checks})
        status = "200 OK" if ready else "503 Service Unavailable"
        return _response(status, "application/json", body)
    return _response("404 Not Found", "application/json", b'{"error":"not found"}')


@contextlib.asynccontextmanager
async def serve_ops(
    *, host: str, port: int, registry: CollectorRegistry, readiness: Readiness
) -> AsyncIterator[asyncio.Server]:
    """Serve /metrics, /healthz, /readyz until the context exits."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = line[:_MAX_REQUEST_LINE].decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in {"GET", "HEAD"}:
                payload = render(parts[1].split("?", 1)[0], registry, readiness)
            else:
                payload = _response("405 Method Not Allowed", "text/plain", b"GET only\n")
            writer.write(payload)
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.debug("ops request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(on_client, host, port)
    bound = server.sockets[0].getsockname()
    log.info("serving /metrics /healthz /readyz", extra={"host": bound[0], "port": bound[1]})
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


class TaskSupervisor:
    """A service's long-running tasks; one that ends on its own fails the service."""

    def __init__(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.failed: list[str] = []

    def watch(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Fail the service if `task` ends before `stop` is set, or with an exception."""
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if self._stop.is_set() and error is None:
            return  # a clean stop
        self.failed.append(task.get_name())
        log.error(
            "long-running task ended, stopping the service: %r",
            error if error is not None else "returned",
            extra={"task": task.get_name()},
            exc_info=error,
        )
        self._stop.set()

    def healthy(self) -> bool:
        """No watched task has failed."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """1 when a task failed (so a supervisor restarts the service), else 0."""
        return 1 if self.failed else 0


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM or SIGINT (call from inside the running loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
