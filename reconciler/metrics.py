"""The daemon's Prometheus metrics and the HTTP endpoint that serves them.

One registry per daemon (not prometheus-client's global one), so a test or an
embedding program can run several. Names follow Prometheus conventions:
counters end in `_total`, durations are in seconds.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from compiler.errors import KernformError

# Passes range from a millisecond (nothing to do) to seconds (a first apply of 10,000 elements).
PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsError(KernformError):
    """The metrics endpoint cannot be served (a bad address, the port is taken): the operator must pick another."""


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.passes = Counter("kernform_passes", "Reconcile passes run, by what started them", ["trigger"],
                              registry=r)
        self.failed_passes = Counter("kernform_failed_passes",
                                     "Passes that could not make the kernel hold the desired state", registry=r)
        self.applied_actions = Counter("kernform_applied_actions", "Actions applied to the kernel, by op and kind",
                                       ["op", "kind"], registry=r)
        self.drift_repairs = Counter("kernform_drift_repairs",
                                     "Objects put back after something else changed or removed them, by kind",
                                     ["kind"], registry=r)
        self.events = Counter("kernform_events", "Events that asked for a pass, by source", ["source"], registry=r)
        self.file_valid = Gauge("kernform_file_valid", "1 when the intent file loads and compiles, 0 otherwise",
                                registry=r)
        self.degraded = Gauge("kernform_degraded",
                              "1 while the kernel may not hold the current file (invalid or missing file, "
                              "failing passes)", registry=r)
        self.last_success = Gauge("kernform_last_success_timestamp_seconds",
                                  "Unix time of the last pass that left the kernel holding the desired state",
                                  registry=r)
        self._last_success_monotonic: float | None = None
        self.since_success = Gauge("kernform_seconds_since_last_success",
                                   "Seconds since the last successful pass (NaN before the first)", registry=r)
        self.since_success.set_function(self._seconds_since_success)
        self.pass_duration = Histogram("kernform_pass_duration_seconds",
                                       "Duration of reconcile passes (load, compile, observe, diff, apply, verify)",
                                       buckets=PASS_BUCKETS, registry=r)
        self.desired_objects = Gauge("kernform_desired_objects", "Kernel objects the intent wants", registry=r)
        self.info = Gauge("kernform_info", "The daemon's target", ["intent", "target", "backend"], registry=r)
        # Per intent: a daemon watching a directory holds many.
        self.intent_valid = Gauge("kernform_intent_valid",
                                  "1 when the intent's file loads, compiles and conflicts with no other intent",
                                  ["intent"], registry=r)
        self.intent_desired_objects = Gauge("kernform_intent_desired_objects", "Kernel objects the intent wants",
                                            ["intent"], registry=r)
        self.intent_in_sync = Gauge("kernform_intent_in_sync",
                                    "1 when the last pass left the kernel holding the intent's desired state",
                                    ["intent"], registry=r)
        self._server: Any = None

    def _seconds_since_success(self) -> float:
        if self._last_success_monotonic is None:
            return math.nan
        return time.monotonic() - self._last_success_monotonic

    def succeeded(self) -> None:
        self._last_success_monotonic = time.monotonic()
        self.last_success.set(time.time())

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on `address` (PORT, :PORT, HOST:PORT or [V6]:PORT; port 0 picks one). Returns the bound address."""
        host, port = parse_address(address)
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_address(address: str) -> tuple[str, int]:
    text = address.strip()
    host, port = "0.0.0.0", text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        host = host or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise MetricsError(f"--metrics {address!r}: expected PORT, :PORT, HOST:PORT or [V6]:PORT") from None
    if not 0 <= number <= 65535:
        raise MetricsError(f"--metrics {address!r}: port {number} is out of range")
    return host, number
