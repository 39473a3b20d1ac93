"""The supervisor's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/metrics`` sums the metric files of every local process (prometheus-client's multiprocess
collector), so it shows the whole local group. ``/healthz`` answers 200 while the supervisor's
loop runs; ``/readyz`` answers 200 only while every local consumer is subscribed and registered
as of a recent report (see ``processor.group.slot``), 503 with the reason otherwise. Nothing it
serves carries a credential.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]


class HealthServer:
    def __init__(
        self, addr: str, port: int, alive: Probe, ready: Probe, *collectors: Collector
    ) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # Read at scrape time in this process, beside the multiprocess files.
        for collector in collectors:
            registry.register(collector)

        def metrics() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

        def probe(check: Probe) -> Callable[[], tuple[int, str, bytes]]:
            def answer() -> tuple[int, str, bytes]:
                ok, why = check()
                return (200 if ok else 503), "text/plain; charset=utf-8", f"{why}\n".encode()

            return answer

        routes = {"/metrics": metrics, "/healthz": probe(alive), "/readyz": probe(ready)}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.partition("?")[0])
                if route is None:
                    status, kind, body = (
                        404,
                        "text/plain",
                        b"not found: /metrics /healthz /readyz\n",
                    )
                else:
                    status, kind, body = route()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics endpoint: " + format, *args)

        self._server = ThreadingHTTPServer((addr, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-endpoint", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
