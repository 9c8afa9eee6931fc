"""The oneDNN conv never crashes or hangs, however JAX runs it (issue 29): each check of
tests/onednn_safety.py in its own process, so that a segfault is a failed test showing its
stderr, never a dead pytest worker. Every check runs on the ISA this suite runs with (.ci/run
runs the whole suite again capped to AVX2, where the crash showed); the repros run capped to
AVX2 here, so a plain `make test` on an AVX-512 machine meets that kind too (100 times by hand:
`python tests/onednn_safety.py repro 100`)."""
import os
import subprocess
import sys

import pytest

from vggjax.model import onednn
from vggjax.utils.cache import cache_dir

pytestmark = pytest.mark.skipif(onednn.unavailable() is not None,
                                reason=f"oneDNN conv unavailable: {onednn.unavailable()}")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_safety.py")
# Far above a check's run time (10-25 s on 2 cores), far below CI's limit:
# the old scratchpad bug also *hung* a check once memory was corrupted.
CHECK_TIMEOUT = 240


# The repros' shapes are in the grid (2x2, jitted and eager) and the fine-tune step (VGG16 at
# 32 px): they run on their own only capped to AVX2, the kind they crashed on.
@pytest.mark.parametrize("check, cap", [("repro", "AVX2"), ("grid", "this CPU"),
                                        ("finetune", "this CPU"), ("threads", "this CPU")])
def test_no_crash_and_xla_values(check, cap, subprocess_env):
    env = dict(subprocess_env, VGGJAX_CACHE=str(cache_dir()))  # the oneDNN library built once
    if cap == "AVX2":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", XLA_FLAGS="--xla_cpu_max_isa=AVX2")
    try:
        proc = subprocess.run([sys.executable, SCRIPT, check], env=env, capture_output=True,
                              text=True, timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"onednn_safety.py {check} ({cap}) hung: no exit in {CHECK_TIMEOUT} s")
    died = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    assert proc.returncode == 0, f"onednn_safety.py {check} ({cap}): {died}\n{proc.stderr[-3000:]}"
    assert ": ok" in proc.stdout
