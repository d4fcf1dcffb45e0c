"""Shared fixtures: the sandbox lab (network namespaces only) for kernel and end-to-end tests.

Only lab fixtures live here. Each test session builds its own lab under a
prefix of its own (``kft<pid % 1000>``), so sessions running side by side, and
a demo lab under the default prefix ``kf``, never see each other.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from kernform import lab as lab_mod
from kernform.lab import LabMap


@pytest.fixture(scope="session", autouse=True)
def _audit_trail_of_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' applies keep their audit records (reconciler.audit) to themselves, not in the host's
    /var/log/kernform; subprocesses inherit the setting."""
    saved = os.environ.get("KERNFORM_AUDIT_LOG")
    os.environ["KERNFORM_AUDIT_LOG"] = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KERNFORM_AUDIT_LOG", None)
        else:
            os.environ["KERNFORM_AUDIT_LOG"] = saved


def lab_prefix(tag: str = "kft") -> str:
    """A lab prefix unique to this test session (and to ``tag``)."""
    return f"{tag}{os.getpid() % 1000}"


@pytest.fixture(scope="session")
def lab() -> Iterator[LabMap]:
    """The session's lab, built once and removed at the end. Tests must leave it as they found it."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("the lab needs iproute2's ip")
    prefix = lab_prefix()
    try:
        yield lab_mod.up(prefix)
    finally:
        lab_mod.down(prefix)
