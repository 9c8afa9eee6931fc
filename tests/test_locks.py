"""utils/locks.py through filelock: vggjax imports, locks and writes where `fcntl` does not exist."""
import subprocess
import sys

from helpers import script_env

WITHOUT_FCNTL = """
import sys
sys.modules["fcntl"] = None  # what Windows has: no fcntl module
import warnings
warnings.simplefilter("ignore")  # filelock: "only soft file lock is available"
import vggjax
from pathlib import Path
from vggjax.utils import atomic, locks
folder = Path(sys.argv[1])
with locks.locked(folder, "--workdir w"):
    try:
        with locks.locked(folder, "--workdir w"):
            print("taken twice")
    except locks.BusyError as err:
        print(err)
    with atomic.writing(folder / "out.txt") as tmp:
        tmp.write_text("written")
print(sorted(p.name for p in folder.iterdir()), (folder / "out.txt").read_text())
"""


def test_import_lock_and_write_without_fcntl(tmp_path):
    folder = tmp_path / "w"  # beside the cache that script_env points at
    folder.mkdir()
    result = subprocess.run([sys.executable, "-c", WITHOUT_FCNTL, str(folder)], env=script_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    busy, listing = result.stdout.splitlines()
    assert busy == "--workdir w is in use by another vggjax run (pid unknown); wait for it to finish or choose another one"
    assert listing == "['.vggjax-owned.json', 'out.txt'] written"
