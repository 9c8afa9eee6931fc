"""Ctrl-C and SIGTERM at any instant of a command: one line, status 130 / 143, no temporary left, the
previous output intact (or the new one complete), and a resumed training run bit-identical.

The default run sweeps a few instants (a swallowed Ctrl-C, a conversion while JAX loads and while
Orbax writes, a killed writer's temporaries, a checkpoint killed before its record); the full
sweeps of a conversion, an export and a training run are slow tests."""
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from helpers import REPO, run_script, script_env
from vggjax.inference import classifier
from vggjax.train import checkpoint, report
from vggjax.utils import interrupts, ownership
from vggjax.utils.trees import flatten
from vggjax.weights.keras import write_legacy_h5

CONVERT = os.path.join(REPO, "tools", "convert_weights.py")
EXPORT = os.path.join(REPO, "tools", "export.py")
FINETUNE = os.path.join(REPO, "examples", "finetune_catsdogs.py")
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def _handling(pid: int) -> bool:
    """Whether process `pid` catches SIGTERM yet: vggjax's handler is in place (`interrupts.command`);
    before it, Python itself is still starting."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # it ended
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def interrupt(cmd, env, sig, when, timeout=300) -> tuple[int, str, str]:
    """Run `cmd`, send `sig` once `when(proc)` is true (polled every 5 ms after vggjax handles
    signals); (status, stdout, stderr). `when` may return "late": the run ended first."""
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + timeout
    while not _handling(proc.pid) or not when(proc):
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def after(seconds: float):
    start = []

    def when(proc):
        start.append(time.time()) if not start else None
        return time.time() - start[0] >= seconds
    return when


def leftovers(directory, env) -> list[str]:
    """Temporaries (vggjax's or Orbax's) anywhere under `directory`, and records of temporaries."""
    registry = Path(env["VGGJAX_CACHE"]) / "temps"
    return [str(p) for p in Path(directory).rglob("*") if ".tmp-" in p.name or ".old-" in p.name
            or "orbax-checkpoint-tmp" in p.name] + (os.listdir(registry) if registry.is_dir() else [])


def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def check_outcome(status, out, err, sig, output: Path, before: dict, message: str):
    """Interrupted: status 128+sig, one line, `output` as `before`; or finished first: complete."""
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if status == 0:  # the signal came after the command had finished
        assert err == "" and output.is_dir(), err
        return "finished"
    assert status == 128 + sig, (status, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    if lines[0] == f"error: interrupted; {message}":
        assert (tree(output) if output.exists() else {}) == before
        return "stopped"
    assert lines[0] in (f"error: interrupted; {output} was complete before it stopped",
                        "error: interrupted; what it printed above is complete"), err
    return "complete"


# --- fast: the mechanisms, at the instants that used to fail -------------------------------------

def test_a_ctrl_c_swallowed_by_a_gc_callback_still_stops_the_write(tmp_path, subprocess_env):
    """Python reports a KeyboardInterrupt raised in a gc callback (JAX's _xla_gc_callback) as
    "Exception ignored" and goes on; the write must stop before its rename all the same."""
    script = textwrap.dedent(f"""
        import gc, os, signal
        from vggjax.utils import atomic, interrupts

        def callback(phase, info):  # Ctrl-C arrives while a gc callback runs
            if phase == "start":
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))  # Python code: the handler runs here, inside the callback

        def main():
            with atomic.writing({str(tmp_path / "d" / "out")!r}) as tmp:
                tmp.write_text("half")
                gc.callbacks.append(callback)
                gc.collect()
                gc.callbacks.remove(callback)
                tmp.write_text("whole")
            print("written")
            return 0

        interrupts.run_command(main, "nothing was written")
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "error: interrupted; nothing was written\n")
    assert list((tmp_path / "d").iterdir()) == []


def test_a_killed_writers_temporaries_are_removed_by_the_next_command_of_any_kind(tmp_path, subprocess_env):
    script = textwrap.dedent(f"""
        import time
        from vggjax.utils import atomic
        with atomic.writing({str(tmp_path / "d" / "out")!r}, directory=True) as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.kill()
    proc.wait()
    (left,) = (tmp_path / "d").iterdir()
    mine = tmp_path / "d" / f".other.tmp-{os.getpid()}-0123456789ab"  # a live process's: kept
    mine.mkdir()
    result = run_script(CONVERT, "--help", env=subprocess_env)  # another command, another target
    assert result.returncode == 0 and not left.exists() and mine.exists(), result.stderr
    assert os.listdir(Path(subprocess_env["VGGJAX_CACHE"]) / "temps") == []


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, make_variables):
    tmp = tmp_path_factory.mktemp("interrupts")
    path = tmp / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(make_variables("vgg16", include_top=False, seed=3)["params"], path)
    return path


def _convert_args(h5, out):
    return ["--source", "keras", "--arch", "vgg16", "--input", h5, "--output", out, "--overwrite",
            "--quiet"]  # no progress bar: stderr is the one line


@pytest.mark.parametrize("sig, instant", [
    pytest.param(signal.SIGTERM, "while JAX loads", marks=pytest.mark.slow),  # the sweep covers it too
    (signal.SIGINT, "while Orbax writes")])
def test_an_interrupted_conversion_keeps_the_previous_output(weights_file, tmp_path, sig, instant):
    out = tmp_path / "d" / "out"
    vggjax.convert_file("keras", "vgg16", weights_file, out)
    before = tree(out)
    when = (lambda proc: True) if instant == "while JAX loads" else (
        lambda proc: bool(list(out.parent.glob(".out.tmp-*/checkpoint*/*"))))
    env = script_env(tmp_path)
    status, out_text, err = interrupt([sys.executable, CONVERT, *_convert_args(weights_file, out)], env, sig, when)
    assert check_outcome(status, out_text, err, sig, out, before, "nothing was written") == "stopped"
    assert leftovers(out.parent, env) == []


def test_a_checkpoint_killed_before_its_record_is_removed_on_resume_and_by_restart(tmp_path, caplog):
    state = {"w": np.arange(6, dtype=np.float32)}
    mngr = checkpoint.manager(tmp_path / "ckpt", "val_loss")
    checkpoint.save(mngr, 1, state, {"epoch": 1}, {"val_loss": 1.0})
    # What a kill -9 between Orbax's write and the record leaves: step 2 recorded as being written.
    checkpoint._record(tmp_path / "ckpt", writing=2)
    mngr.save(2, metrics={"val_loss": 0.5}, force=True, args=checkpoint._ocp().args.Composite(
        state=checkpoint._ocp().args.StandardSave({"w": state["w"] + 1}),
        meta=checkpoint._ocp().args.JsonSave({"epoch": 2})))
    mngr.wait_until_finished()
    assert ownership.unowned(tmp_path, ["ckpt"]) is None  # vggjax's: --restart may delete it
    with caplog.at_level(logging.WARNING, logger="vggjax"):
        restored, meta = checkpoint.restore_latest(mngr, state, lambda meta: None)
    logged = [r.getMessage() for r in caplog.records]
    assert meta == {"epoch": 1} and np.array_equal(restored["w"], state["w"])  # step 2 never loaded
    assert logged == [f"checkpoint 2 in {tmp_path / 'ckpt'} was cut short by a kill as it was saved; "
                      "removed it, trying the previous one"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["1"]
    ownership.remove_owned([tmp_path / "ckpt"])
    assert not (tmp_path / "ckpt").exists()


def test_ctrl_c_while_orbax_reads_a_checkpoint_stops_the_resume_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """Orbax re-raises whatever its reads meet, Ctrl-C included, as a plain Exception: undeferred,
    that printed a traceback (CI's training sweep) and would set a good checkpoint aside as damaged."""
    state = {"w": jnp.arange(6, dtype=jnp.float32)}  # JAX arrays: read by TensorStore, as training's
    mngr = checkpoint.manager(tmp_path / "ckpt", "val_loss")
    checkpoint.save(mngr, 1, state, {"epoch": 1}, {"val_loss": 1.0})
    serialization = importlib.import_module("orbax.checkpoint._src.serialization.serialization")
    read_shard = serialization._read_shard

    async def interrupted_read(*args, **kwargs):  # the signal lands inside Orbax's read
        os.kill(os.getpid(), signal.SIGINT)
        return await read_shard(*args, **kwargs)

    monkeypatch.setattr(serialization, "_read_shard", interrupted_read)
    with pytest.raises(interrupts.Interrupted), interrupts.handling():
        checkpoint.restore_latest(mngr, state, lambda meta: None)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]  # not set aside
    monkeypatch.undo()
    restored, meta = checkpoint.restore_latest(checkpoint.manager(tmp_path / "ckpt", "val_loss"), state,
                                               lambda meta: None)
    assert meta == {"epoch": 1} and np.array_equal(restored["w"], state["w"])


# --- slow: the sweeps ------------------------------------------------------------------------------

def _sweep(cmd, env, output: Path, sig, instants, message):
    before = tree(output) if output.exists() else {}
    outcomes = []
    for t in instants:
        status, out, err = interrupt(cmd, env, sig, after(t))
        outcomes.append(check_outcome(status, out, err, sig, output, before, message))
        assert leftovers(output.parent, env) == [], t
        if outcomes[-1] != "stopped":  # a new output: the next instants start from it
            before = tree(output)
    return outcomes


def _instants(seconds: float, n: int) -> list[float]:
    return list(np.linspace(0.0, seconds * 1.1, n))


def _timed(cmd, env) -> float:
    start = time.time()
    subprocess.run(list(map(str, cmd)), env=env, check=True, capture_output=True)
    return time.time() - start


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_sweep_a_conversion(weights_file, tmp_path, sig):
    out = tmp_path / "d" / "out"
    env = script_env(tmp_path)
    cmd = [sys.executable, CONVERT, *_convert_args(weights_file, out)]
    seconds = _timed(cmd, env)  # the previous output the interrupted runs must keep
    outcomes = _sweep(cmd, env, out, sig, _instants(seconds, 16), "nothing was written")
    assert outcomes.count("stopped") >= 8, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jax", "onnx"])
@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_sweep_an_export(weights_file, tmp_path, sig, fmt):
    weights = tmp_path / "weights"
    vggjax.convert_file("keras", "vgg16", weights_file, weights)
    out = tmp_path / "d" / "out"
    env = script_env(tmp_path)
    cmd = [sys.executable, EXPORT, weights, "--format", fmt, "--output", out, "--image-size", "32",
           "--overwrite", "--quiet"]  # no progress bar: stderr is the one line
    seconds = _timed(cmd, env)
    outcomes = _sweep(cmd, env, out, sig, _instants(seconds, 10), "nothing was written")
    assert outcomes.count("stopped") >= 5, outcomes


@pytest.fixture(scope="module")
def smoke_reference(tmp_path_factory):
    """An uninterrupted `--smoke` run with a checkpoint every 3 steps, and its duration."""
    tmp = tmp_path_factory.mktemp("smoke")
    start = time.time()
    proc = run_script(FINETUNE, "--smoke", "--workdir", tmp / "run", "--checkpoint-every", "3",
                      "--quiet", env=script_env(tmp), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run", time.time() - start


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_sweep_a_training_run_and_resume_bit_identically(smoke_reference, tmp_path, sig):
    reference, seconds = smoke_reference
    want = flatten(classifier.load_classifier(reference / "classifiers" / "finetune").variables)
    env = script_env(tmp_path)
    for k, t in enumerate(_instants(seconds, 5)[1:-1]):  # inside the run, Orbax's writes included
        workdir = tmp_path / f"run{k}"
        shutil.copytree(reference / "smoke_inputs", workdir / "smoke_inputs")  # the same seeded data
        args = ["--smoke", "--workdir", workdir, "--checkpoint-every", "3", "--quiet"]
        status, out, err = interrupt([sys.executable, FINETUNE, *args], env, sig, after(t), timeout=900)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        if status != 0:
            assert status == 128 + sig and err.splitlines()[-1:] == [
                "error: interrupted; run the same command again to resume"], (t, status, err)
        assert leftovers(workdir, env) == [], t
        resumed = run_script(FINETUNE, *args, env=env, timeout=900)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        for name in (report.HISTORY, report.RESULTS):
            assert json.loads((workdir / name).read_text()) == json.loads((reference / name).read_text())
        have = flatten(classifier.load_classifier(workdir / "classifiers" / "finetune").variables)
        assert [k for k in want if not np.array_equal(np.asarray(have[k]), np.asarray(want[k]))] == []
