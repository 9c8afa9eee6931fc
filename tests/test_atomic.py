"""atomic.writing: complete or absent, replaces only vggjax's own directories, leaves no temporaries."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import write_dir
from vggjax.utils import atomic, locks, ownership


def test_a_directory_appears_complete_and_replaces_only_a_vggjax_one(tmp_path):
    out = tmp_path / "out"
    write_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["data.bin", "vggjax.json"]
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass overwrite=True to replace it"):
        write_dir(out)
    write_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "out"]  # no temp or old dir left


def test_overwrite_never_deletes_user_files_the_input_or_the_working_directory(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(atomic.RefusedError, match=r"mine holds files vggjax did not write \(mine/thesis.tex\)"):
        write_dir(mine, overwrite=True)
    # A vggjax output that holds the input file, or the working directory, is not replaced either.
    out = tmp_path / "out"
    write_dir(out)
    (out / "input.h5").write_bytes(b"weights")
    with pytest.raises(atomic.RefusedError, match=r"out contains .*input.h5; refusing to replace it"):
        write_dir(out, overwrite=True, protect=[out / "input.h5"])
    with pytest.raises(atomic.RefusedError, match=r"out/new is inside the input .*out; vggjax does not write"):
        write_dir(out / "new", protect=[out])  # an input directory is read, never written into
    assert not (out / "new").exists()
    monkeypatch.chdir(out)
    with pytest.raises(atomic.RefusedError, match="refusing to replace it"):
        write_dir(".", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # --output . in an empty working directory: never renamed over
    with pytest.raises(atomic.RefusedError, match="empty contains .*empty; refusing to replace it"):
        write_dir(".")
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert (mine / "thesis.tex").read_text() == "years of work" and (out / "input.h5").is_file()


def test_a_symlink_is_refused_before_anything_is_written(tmp_path):
    real = tmp_path / "real"
    write_dir(real)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(atomic.RefusedError, match="link is a symbolic link"):
        write_dir(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "link", "real"]


def test_an_exception_removes_the_temporary_and_keeps_the_old_content(tmp_path):
    out = tmp_path / "out.json"
    with atomic.writing(out) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.writing(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ownership.OWNED, "out.json"]


def test_temporaries_of_a_killed_process_are_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / f".out.tmp-{dead.stdout.strip()}-0123abcd"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 1000)
    alive = tmp_path / f".out.tmp-{os.getpid()}-4567cdef"  # a writer of this very process: kept
    alive.mkdir()
    write_dir(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, ownership.OWNED, "out"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_writing_leaves_nothing_behind(tmp_path, sig, subprocess_env):
    script = textwrap.dedent(f"""
        import time
        from vggjax.utils import atomic
        with atomic.writing({str(tmp_path / "d" / "out")!r}, directory=True) as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.1)
    assert list((tmp_path / "d").iterdir()) == []
    assert list((tmp_path / "cache" / "temps").iterdir()) == []  # nor its record


def test_only_what_vggjax_wrote_and_nobody_changed_is_replaced(tmp_path):
    out = tmp_path / "out"
    write_dir(out)
    (out / "thesis.tex").write_text("years of work")  # a user's file put into a vggjax output
    with pytest.raises(atomic.RefusedError, match=r"out holds files vggjax did not write \(out/thesis.tex\)"):
        write_dir(out, overwrite=True)
    (out / "thesis.tex").unlink()
    (out / "data.bin").write_bytes(b"edited")  # same name, not the content vggjax wrote
    with pytest.raises(atomic.RefusedError, match=r"out/data.bin"):
        write_dir(out, overwrite=True)
    assert (out / "data.bin").read_bytes() == b"edited"
    # A single file: vggjax's own is replaced, a user's file of that name is not.
    cam = tmp_path / "cat_cam.png"
    cam.write_bytes(b"the user's")
    with pytest.raises(atomic.RefusedError, match="cat_cam.png exists and vggjax did not write it"):
        with atomic.writing(cam) as tmp:
            tmp.write_bytes(b"vggjax's")
    assert cam.read_bytes() == b"the user's"
    cam.unlink()
    for content in (b"first", b"second"):
        with atomic.writing(cam) as tmp:
            tmp.write_bytes(content)
    assert cam.read_bytes() == b"second"


def test_a_locked_directory_refuses_a_second_process_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from vggjax.utils import locks
        with locks.locked({str(tmp_path)!r}, "--workdir w"):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(locks.BusyError, match=rf"--workdir w is in use by another vggjax run \(pid {holder.pid}\)"):
            with locks.locked(tmp_path, "--workdir w"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locks.locked(tmp_path, "--workdir w"):  # a killed holder leaves no stale lock
        pass
