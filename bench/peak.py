"""`python -m bench.peak ARGS...`: run `kernform ARGS...` and write its peak RSS (VmHWM, KiB) at exit.

Why not wait4's ru_maxrss: a child forked from the (large) benchmark process
starts with the parent's resident pages counted, and Linux keeps that maximum
across exec, so ru_maxrss would report the benchmark's size, not kernform's.
VmHWM belongs to the address space, which exec replaces: read at exit, it is
the peak of the kernform process alone. The file named by KFBENCH_PEAK_FILE
receives the number.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys


def _record() -> None:
    path = os.environ.get("KFBENCH_PEAK_FILE")
    if not path:
        return
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(path, "w") as out:
                    out.write(line.split()[1])
                return


atexit.register(_record)
sys.argv = ["kernform", *sys.argv[1:]]
runpy.run_module("kernform", run_name="__main__", alter_sys=True)
