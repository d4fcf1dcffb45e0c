"""kernform's compiler: a NetworkIntent in, the desired kernel objects out. Pure: no kernel I/O."""

from __future__ import annotations

from .errors import KernformError
from .intent import NetworkIntent
from .objects import DesiredState

BACKENDS = ("tproxy", "ebpf")


class BackendUnavailable(KernformError):
    """The chosen backend cannot compile this intent yet: the user must pick another backend."""


def compile_intent(intent: NetworkIntent, backend: str | None = None) -> DesiredState:
    """Lower `intent` for `backend` (default: the intent's spec.backend)."""
    chosen = backend or intent.spec.backend
    if chosen == "tproxy":
        from . import tproxy

        return tproxy.compile_intent(intent)
    if chosen == "ebpf":
        raise BackendUnavailable(
            "the ebpf backend is not implemented yet (tracked in issue #3); use --backend tproxy"
        )
    raise BackendUnavailable(f"unknown backend {chosen!r} (choose one of {', '.join(BACKENDS)})")
