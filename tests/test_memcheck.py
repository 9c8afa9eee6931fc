"""valgrind's memcheck over the oneDNN custom calls (issue 29): a small model's forward and
backward, eager and jitted (tests/memcheck_workload.py), with no invalid read or write whose
stack passes through vggjax's handlers or oneDNN. Under valgrind XLA's compiler alone takes
tens of minutes, too long for CI's budget, so it has its own marker and runs by hand:
`VGGJAX_MEMCHECK_LOG=memcheck.log pytest -m memcheck tests/test_memcheck.py` (the log is kept). valgrind reports the CPU without AVX-512, so oneDNN runs its AVX2 kernels under
it (the kind where the scratchpad bug crashed) and bf16 is not run.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from vggjax.model import onednn
from vggjax.utils.cache import cache_dir

WORKLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memcheck_workload.py")
# An error block of valgrind's log is a run of "==PID== " lines ending at an empty one.
BLOCK = re.compile(r"^==\d+== (\S.*?)(?=^==\d+== ?$)", re.M | re.S)
OURS = ("onednn_conv-", "libdnnl")  # frames in vggjax's handlers or in oneDNN itself
KINDS = ("Invalid read", "Invalid write", "Invalid free", "Mismatched free", "Source and destination overlap",
         "Use of uninitialised value", "Conditional jump or move depends on uninitialised")


def memcheck_errors(log: str) -> list[str]:
    """The error blocks of a valgrind log that pass through vggjax's handlers or oneDNN."""
    return [b for b in BLOCK.findall(log)
            if b.startswith(KINDS) and any(lib in b for lib in OURS)]


def test_the_filter_keeps_our_errors_only():
    log = ("==7== Invalid write of size 4\n==7==    at 0x1: im2col (in /x/libdnnl.so.3)\n==7== \n"
           "==7== Invalid read of size 8\n==7==    at 0x2: PyObject_Free (in /usr/bin/python)\n==7== \n")
    assert memcheck_errors(log) == ["Invalid write of size 4\n==7==    at 0x1: im2col (in /x/libdnnl.so.3)\n"]


@pytest.mark.memcheck
@pytest.mark.timeout(3600)
@pytest.mark.skipif(onednn.unavailable() is not None, reason=f"oneDNN conv unavailable: {onednn.unavailable()}")
def test_no_invalid_access_in_the_custom_calls(tmp_path, subprocess_env):
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind is not installed")
    log = os.environ.get("VGGJAX_MEMCHECK_LOG") or str(tmp_path / "memcheck.log")
    env = dict(subprocess_env, VGGJAX_CACHE=str(cache_dir()), PYTHONMALLOC="malloc")
    proc = subprocess.run(
        [valgrind, "--tool=memcheck", "--error-limit=no", "--smc-check=all-non-file",
         f"--log-file={log}", sys.executable, WORKLOAD],
        env=env, capture_output=True, text=True, timeout=3500)
    text = open(log).read()
    assert proc.returncode == 0, f"the workload failed under valgrind: {proc.stderr[-2000:]}\n{text[-2000:]}"
    assert "float32 jit: forward and backward done" in proc.stdout
    errors = memcheck_errors(text)
    assert not errors, f"{len(errors)} memcheck errors in the custom calls; the first:\n{errors[0][:3000]}"
