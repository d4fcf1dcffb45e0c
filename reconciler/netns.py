"""Entering a network namespace for the calling thread, and leaving it again.

This module owns the one piece of process state kernform changes to reach a
named network namespace: the calling thread's `net` namespace. `entered(name)`
switches the thread into `/run/netns/NAME` with libc `setns(2)` and switches it
back on exit, exceptions included.

Why a thread switch and not a helper process: a socket belongs to the
namespace it was created in, for its whole life. So drivers open their netlink
and libnftables sockets inside `entered()` and keep using them after leaving;
creating a socket this way costs microseconds, where pyroute2's own `netns=`
support forks a child process per socket (and, by default, creates the
namespace when it is missing, which we never want).

`setns(2)` with CLONE_NEWNET changes only the calling thread, so other threads
of the process are unaffected. Python 3.11 has no `os.setns`, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from pathlib import Path

from compiler.errors import InternalError, KernelError

NETNS_RUN_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000

_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def path_of(netns: str) -> Path:
    """The bind-mount `ip netns add NAME` creates. Names are plain file names, never paths."""
    if not netns or "/" in netns or netns in (".", ".."):
        raise KernelError(f"{netns!r} is not a network namespace name")
    return NETNS_RUN_DIR / netns


def exists(netns: str | None) -> bool:
    """Whether the named namespace exists; None is the current namespace, which always does."""
    if netns is None:
        return True
    try:
        return path_of(netns).exists()
    except KernelError:
        return False


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace `netns` (None: stay where it is).

    Sockets created in the body keep belonging to `netns` after the body ends.
    Raises KernelError when the namespace does not exist or cannot be entered.
    """
    if netns is None:
        yield
        return
    path = path_of(netns)
    # Open the way back before leaving: if the target cannot be entered we
    # have not moved, and if it can we are sure to find home again.
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KernelError(f"network namespace {netns} does not exist ({path} is missing)") from None
        except OSError as exc:
            raise KernelError(f"cannot open network namespace {netns} ({path}): {exc.strerror}") from None
        try:
            _setns(target, CLONE_NEWNET)
        except OSError as exc:
            # EINVAL: the file is not a namespace (e.g. a stale name whose mount is gone).
            raise KernelError(f"cannot enter network namespace {netns}: {exc.strerror}") from None
        finally:
            os.close(target)
        try:
            yield
        finally:
            try:
                _setns(home, CLONE_NEWNET)
            except OSError as exc:
                # The thread would keep acting inside `netns`: never carry on silently.
                raise InternalError(f"could not return from network namespace {netns}: {exc.strerror}") from exc
    finally:
        os.close(home)
