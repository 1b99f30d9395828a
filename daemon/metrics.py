"""Prometheus exposition on loopback (`--metrics HOST:PORT`).

prometheus-client's own HTTP server runs in a daemon thread of its own and reads the
runtime's registry there; its metrics are thread-safe, and the Trio loop never waits
on a scrape. Loopback only: the figures describe traffic, and an operator who wants
them elsewhere puts an authenticated proxy in front.
"""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry, start_http_server


class MetricsAddressError(ValueError):
    pass


def parse_metrics_address(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MetricsAddressError(f"metrics address must be HOST:PORT, not {text!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise MetricsAddressError(f"metrics are served on loopback only; {host!r} is not a loopback address")
    return host, int(port_text)


class MetricsServer:
    """Serves a registry at http://HOST:PORT/metrics (port 0 picks a free one)."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, port = parse_metrics_address(address)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.address = f"{host}:{self._server.server_address[1]}"

    def close(self) -> None:
        """Blocks up to the server's poll interval: call it from a thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
