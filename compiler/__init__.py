"""kernform's compiler: a NetworkIntent in, the desired kernel objects out. Pure: no kernel I/O."""

from __future__ import annotations

from .errors import BackendUnavailable
from .intent import NetworkIntent
from .objects import DesiredState, begin_compile

BACKENDS = ("tproxy", "ebpf")
__all__ = ["BACKENDS", "BackendUnavailable", "compile_intent"]


def compile_intent(intent: NetworkIntent, backend: str | None = None) -> DesiredState:
    """Lower `intent` for `backend` (default: the intent's spec.backend)."""
    chosen = backend or intent.spec.backend
    begin_compile()
    if chosen == "tproxy":
        from . import tproxy

        return tproxy.compile_intent(intent)
    if chosen == "ebpf":
        from . import ebpf as ebpf_backend

        return ebpf_backend.compile_intent(intent)
    raise BackendUnavailable(f"unknown backend {chosen!r} (choose one of {', '.join(BACKENDS)})")
