"""examples/finetune_catsdogs.py end to end in subprocesses: --smoke learns, kill -9 resumes bit-exactly, offline stops at once."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, recorded_steps, run_on_small_disk, run_script, script_env, tensorboard_scalars
from vggjax.inference import classifier
from vggjax.train import data, report, synthetic
from vggjax.utils import locks
from vggjax.utils.trees import flatten

SCRIPT = os.path.join(REPO, "examples", "finetune_catsdogs.py")
SIZE, EPOCHS = synthetic.SETTINGS["image_size"], synthetic.SETTINGS["epochs"]


def _run(args, env, timeout=300):
    return run_script(SCRIPT, *args, env=env, timeout=timeout)


def _error(proc) -> str:
    """The one 'error: ...' line an expected failure ends with (TensorFlow may log above it)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return proc.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One complete `--smoke` run (the reference for the resume test too)."""
    tmp = tmp_path_factory.mktemp("smoke")
    start = time.time()
    proc = _run(["--smoke", "--workdir", str(tmp / "run")], script_env(tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run", proc.stdout, time.time() - start, proc.stderr


@pytest.mark.slow  # the default (tf.data) smoke job; `make demo` runs it with --pipeline grain (test_grain.py)
def test_smoke_run_learns_in_every_phase_and_writes_its_outputs(smoke_run):
    workdir, stdout, seconds, stderr = smoke_run
    assert f"{SIZE}x{SIZE}" in stdout and "RANDOM VGG16 weights" in stdout
    results = json.loads((workdir / report.RESULTS).read_text())
    history = json.loads((workdir / report.HISTORY).read_text())
    assert list(results) == list(history) == ["features", "frozen", "finetune"]
    for phase, r in results.items():
        # Two balanced classes: chance is 0.5.
        assert r["test_accuracy"] >= 0.75 and r["final_val_accuracy"] >= 0.75, (phase, r)
        assert r["test_examples"] == 2 * synthetic.SPLIT_SIZES["test"]
        assert [e["epoch"] for e in history[phase]] == list(range(1, EPOCHS[phase] + 1))
    with Image.open(workdir / report.CURVES) as png:
        assert png.format == "PNG"
    for phase, r in results.items():  # the best epoch by validation loss was tested and exported
        best = min(history[phase], key=lambda h: h["val_loss"])["epoch"]
        assert r["evaluate"] == "best" and r["tested_epoch"] == best, (phase, r)
        # TensorBoard's files, read by its own reader: every epoch as history.json has it.
        runs = tensorboard_scalars(workdir / "tensorboard" / phase)
        for run, prefix in (("train", ""), ("validation", "val_")):
            assert runs[run]["epoch_loss"] == [(h["epoch"], pytest.approx(h[prefix + "loss"], rel=1e-6))
                                               for h in history[phase]]
        assert [e for e, _ in runs["train"]["epoch_learning_rate"]] == [h["epoch"] for h in history[phase]]

    # stderr is a pipe, as a log file: every phase's bars, in whole lines, at most ~11 per bar.
    bars = {}
    for line in stderr.splitlines():
        if match := re.fullmatch(r"(.+?): +\d+%\|[# 0-9]{10}\| \d+/\d+ \[.*img/s.*\]", line):
            bars.setdefault(match[1], []).append(line)
    for desc in ("features of 'train'", "features of 'validation'", "features of 'test'", "features 1/10",
                 "phase features epoch 1: validation", "phase features: test", "frozen 2/2",
                 "phase frozen epoch 2: validation", "finetune 1/2", "phase finetune: test"):
        assert bars.get(desc) and "100%" in bars[desc][-1], (desc, sorted(bars))
    assert "loss=" in bars["finetune 1/2"][-1] and "accuracy=" in bars["finetune 1/2"][-1]
    assert max(map(len, bars.values())) <= 12 and "\r" not in stderr

    # The exported fine-tuned classifier, run on the test JPEGs from disk, scores what
    # results.json says, and its base is a weights directory with the input's layer names.
    test = data.load_split(str(workdir / "smoke_inputs" / "data"), "test", SIZE, 20, shuffle=False)
    images = np.concatenate([b["image"][b["mask"]] for b in test.batches(0)])
    clf = classifier.load_classifier(workdir / "classifiers" / "finetune")
    accuracy = np.mean(classifier.predict(clf, images).argmax(-1) == test.labels)
    assert accuracy == pytest.approx(results["finetune"]["test_accuracy"])
    assert clf.class_names == synthetic.CLASSES
    print(f"smoke run: {seconds:.0f} s, test accuracy "
          + ", ".join(f"{p} {r['test_accuracy']:.3f}" for p, r in results.items()))


@pytest.mark.slow
def test_kill_9_and_rerun_ends_bit_identical_to_the_uninterrupted_run(smoke_run, tmp_path):
    reference = smoke_run[0]
    workdir = tmp_path / "run"
    # Same seeded inputs; copied only to save the time of making them again.
    shutil.copytree(reference / "smoke_inputs", workdir / "smoke_inputs")
    args = ["--smoke", "--workdir", str(workdir), "--checkpoint-every", "3"]
    env = script_env(tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    finetune = workdir / "checkpoints" / "finetune"
    try:
        # Kill as soon as the fine-tuning phase has its first (mid-epoch) checkpoint, saved and
        # recorded (one killed between the two is removed on resume: tests/test_interrupts.py).
        while proc.poll() is None and not recorded_steps(finetune):
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (workdir / "classifiers" / "finetune").exists()

    resumed = _run(args, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert "features of 'train': reusing" in out
    assert "phase features: already finished" in out and "phase frozen: already finished" in out
    assert "phase finetune: resuming at epoch 1, batch " in out

    for name in (report.HISTORY, report.RESULTS):
        assert json.loads((workdir / name).read_text()) == json.loads((reference / name).read_text())
    want = flatten(classifier.load_classifier(reference / "classifiers" / "finetune").variables)
    have = flatten(classifier.load_classifier(workdir / "classifiers" / "finetune").variables)
    assert set(have) == set(want)
    different = [k for k in want if not np.array_equal(np.asarray(have[k]), np.asarray(want[k]))]
    assert different == []


@pytest.mark.slow
def test_data_parallel_run_over_two_devices(smoke_run, tmp_path):
    reference = smoke_run[0]
    workdir = tmp_path / "run"
    shutil.copytree(reference / "smoke_inputs", workdir / "smoke_inputs")
    env = dict(script_env(tmp_path), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    # finetune alone: runs frozen first, since it continues from there.
    proc = _run(["--smoke", "--workdir", str(workdir), "--data-parallel", "--phases", "features,finetune",
                 "--epochs", "1", "--steps-per-epoch", "2"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batches split over 2 devices" in proc.stdout
    assert "phase finetune continues from phase frozen" in proc.stdout
    results = json.loads((workdir / report.RESULTS).read_text())
    assert list(results) == ["features", "frozen", "finetune"]
    assert all(r["test_examples"] == 2 * synthetic.SPLIT_SIZES["test"] for r in results.values())
    history = json.loads((workdir / report.HISTORY).read_text())
    assert all(len(h) == 1 for h in history.values())


def test_without_weights_or_network_it_stops_at_once_saying_what_to_provide(tmp_path):
    env = script_env(tmp_path)
    # Offline, reproducibly: every download goes to a proxy port nobody listens on.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        env[var] = "http://127.0.0.1:9"
    for var in ("no_proxy", "NO_PROXY"):
        env.pop(var, None)
    start = time.time()
    proc = _run(["--data", str(tmp_path / "no_such_folder"), "--workdir", str(tmp_path / "run")], env,
                timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("vggjax convert --source keras --arch vgg16 "
            "--input vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5") in proc.stderr
    assert "--weights DIR" in proc.stderr
    assert f"--data {tmp_path / 'no_such_folder'} lacks" in proc.stderr and "--data DIR" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "converted").exists()
    assert time.time() - start < 60


def test_bad_flag_values_stop_before_any_work(tmp_path):
    """Every bad value named in the one error line (one run: the same check, four flags)."""
    flags = ["--batch-size", "0", "--epochs", "-1", "--image-size", "31", "--steps-per-epoch", "-1"]
    proc = _run(["--smoke", "--workdir", str(tmp_path / "run"), *flags], script_env(tmp_path), timeout=120)
    line = _error(proc)
    assert line.startswith("error: ") and line.count("; ") >= 3, line
    for message in (r"batch_size \(--batch-size\) must be an integer >= 1, found 0",
                    r"epochs \(--epochs\) must be an integer >= 0 .*found -1",
                    r"image_size \(--image-size\) must be an integer >= 32 .*found 31",
                    r"steps_per_epoch \(--steps-per-epoch\) must be .*found -1"):
        assert re.search(message, line), (message, line)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class JPEG folder (4 images per class and split) and two sets of random VGG11 weights."""
    from helpers import random_variables
    from test_workflow import write_folder
    from vggjax import weights

    tmp = tmp_path_factory.mktemp("tiny")
    meta = dict(arch="vgg11", include_top=False, top_input="torch", preprocessing="caffe")
    for seed in (0, 1):
        weights.save(tmp / f"weights{seed}", random_variables("vgg11", False, seed=seed, input_rms=70.0), meta)
    return write_folder(tmp / "data", per_class=4), tmp


def test_a_workdir_is_resumed_only_by_the_same_run_and_epochs_0_only_evaluates(tiny, tmp_path):
    data, weights = tiny
    env = script_env(tmp_path)
    workdir = tmp_path / "run"
    # Grain: no TensorFlow to import, half of each run's time (the tf.data workflow: test_precision.py).
    args = ["--data", str(data), "--weights", str(weights / "weights0"), "--workdir", str(workdir),
            "--phases", "features", "--image-size", "32", "--batch-size", "4", "--pipeline", "grain"]
    proc = _run([*args, "--epochs", "0"], env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((workdir / report.RESULTS).read_text())["features"]
    assert result["epochs"] == 0 and result["best_val_accuracy"] is None and result["test_examples"] == 8
    assert result["tested_epoch"] is None  # the initial parameters: no epoch trained
    assert json.loads((workdir / report.HISTORY).read_text()) == {"features": []}
    assert not (workdir / report.CURVES).exists()
    assert "features: test accuracy" in proc.stdout and "epoch 1/" not in proc.stdout

    again = _run([*args, "--epochs", "0"], env)
    assert again.returncode == 0 and "phase features: already reported" in again.stdout, again.stderr
    # Other image sizes, data or seeds are refused the same way (tests/test_workflow.py).
    # Other weights and another batch size, in one run: both named in the one refusal.
    proc = _run([*args, "--epochs", "0", "--weights", str(weights / "weights1"), "--batch-size", "2"],
                env, timeout=120)
    assert re.fullmatch(rf"error: --workdir {re.escape(str(workdir))} holds another run: "
                        r"--batch-size \(4 there, 2 now\), .*the weights .*; use another --workdir, or "
                        r"--restart to discard that run", _error(proc))
    assert json.loads((workdir / report.RESULTS).read_text())["features"] == result  # untouched


@pytest.mark.parametrize("layout, message", [
    ("one-class", r"train has one class folder \(cats\); a classifier needs at least 2"),
    ("split-classes", r"the splits have different classes: .*\['cats', 'dogs'\].*\['Cats', 'dogs'\]"),
])  # empty splits and classes: tests/test_workflow.py (same check, same one-line path)
def test_data_that_cannot_mean_anything_is_refused(tiny, tmp_path, layout, message):
    from test_workflow import write_folder

    _, weights = tiny
    data = tmp_path / "data"
    if layout == "one-class":
        write_folder(data, classes=("cats",))
    else:
        write_folder(data, splits=("train", "validation"))
        write_folder(data, classes=("Cats", "dogs"), splits=("test",))
    proc = _run(["--data", str(data), "--weights", str(weights / "weights0"), "--workdir",
                 str(tmp_path / "run"), "--image-size", "32"], script_env(tmp_path), timeout=120)
    assert re.fullmatch(rf"error: .*{message}.*", _error(proc))
    assert not (tmp_path / "run").exists()


def test_grain_on_an_unprepared_tfds_is_one_line_before_any_work(tiny, tmp_path):
    _, weights = tiny
    env = dict(script_env(tmp_path), TFDS_DATA_DIR=str(tmp_path / "tfds"))
    proc = _run(["--data", "tfds", "--pipeline", "grain", "--weights", str(weights / "weights0"),
                 "--workdir", str(tmp_path / "run"), "--image-size", "32"], env, timeout=120)
    assert re.fullmatch(rf"error: tfds cats_vs_dogs is not prepared in ArrayRecord under {tmp_path / 'tfds'} "
                        r"\(.*\); prepare it with `tfds build cats_vs_dogs --file_format=array_record`",
                        _error(proc))
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_cannot_be_written_is_one_line(tiny, tmp_path):
    data, weights = tiny
    (tmp_path / "file").write_text("not a folder")
    proc = _run(["--data", str(data), "--weights", str(weights / "weights0"), "--workdir",
                 str(tmp_path / "file" / "run"), "--image-size", "32"], script_env(tmp_path), timeout=120)
    assert re.fullmatch(r"error: cannot use --workdir .*file/run: Not a directory", _error(proc))


def test_a_second_run_in_a_busy_workdir_is_refused_naming_the_holder(tiny, tmp_path):
    data, weights = tiny
    workdir = tmp_path / "run"
    workdir.mkdir()
    with locks.locked(workdir, "held by this test"):  # this process plays the first run
        proc = _run(["--data", str(data), "--weights", str(weights / "weights0"), "--workdir",
                     str(workdir), "--image-size", "32"], script_env(tmp_path), timeout=120)
    assert re.fullmatch(rf"error: --workdir {re.escape(str(workdir))} is in use by another vggjax run "
                        rf"\(pid {os.getpid()}\); wait for it to finish or choose another one", _error(proc))
    assert sorted(p.name for p in workdir.iterdir()) == [locks.LOCK]


def test_a_full_disk_in_the_workdir_is_one_line_and_leaves_no_partial_file(tiny, tmp_path):
    data, weights = tiny
    workdir = tmp_path / "disk" / "run"
    run = [sys.executable, SCRIPT, "--data", data, "--weights", weights / "weights0", "--workdir", workdir,
           "--phases", "features", "--image-size", "32", "--batch-size", "4", "--pipeline", "grain",
           "--quiet"]  # stderr: the error line alone
    cache, ckpt = run_on_small_disk(workdir.parent, [("24k", run), ("300k", run)], script_env(tmp_path))
    # The feature cache is a memory map: without its blocks reserved, a full disk was a SIGBUS.
    assert cache["rc"] == 2 and re.fullmatch(
        rf"error: no space left on device while writing {re.escape(str(workdir))}/features_cache/"
        r"train-\w+; nothing was written: free some space or choose another place\n", cache["stderr"])
    # Orbax's writer threads: no asyncio or absl tracebacks, no half-written step.
    assert ckpt["rc"] == 2 and ckpt["stderr"] == (
        f"error: no space left on device while writing checkpoint 2 in {workdir}/checkpoints/features; "
        "any checkpoints before it are intact: free some space and run the same command to resume\n")
    for step in (cache, ckpt):
        assert not [p for p in step["left"] if ".tmp" in p or "orbax-checkpoint-tmp" in p], step["left"]
    assert "run/checkpoints/features" in ckpt["left"] and "run/features_cache" in cache["left"]


def test_a_workdir_of_the_users_files_under_vggjax_s_names_survives_restart(tiny, tmp_path):
    data, weights = tiny
    workdir = tmp_path / "run"
    mine = {"checkpoints/mymodel.pt": b"the user's model", "export/report.pdf": b"the user's report",
            "config.json": b"{}"}  # what an older vggjax (no ownership records) or the user left: no run.json
    for rel, content in mine.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes(content)
    args = ["--data", data, "--weights", weights / "weights0", "--workdir", workdir, "--phases",
            "features", "--image-size", "32", "--batch-size", "4", "--pipeline", "grain"]
    for extra in ([], ["--restart"]):
        proc = _run([*args, *extra], script_env(tmp_path), timeout=120)
        assert _error(proc) == (
            f"error: --workdir {workdir} holds outputs without run.json that vggjax did not write "
            "(run/config.json, run/checkpoints/mymodel.pt, run/export/report.pdf): an older vggjax's "
            "or your own; remove them by hand or use another --workdir")
    assert {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()
            and p.name != locks.LOCK} == mine


def test_sigterm_while_training_compiles_is_one_line_and_a_clean_exit(tiny, tmp_path):
    """Python's shutdown under a cut-short XLA compilation could crash (SIGSEGV, exit -11) after
    the message; now the process ends without it (interrupts.run_command). The crash was not certain
    at any one moment, so this run proves the message and status, not the crash's absence."""
    sig = signal.SIGTERM  # Ctrl-C takes the same path: tests/test_convert_weights.py has both
    data, weights = tiny
    proc = subprocess.Popen([sys.executable, SCRIPT, "--data", data, "--weights", weights / "weights0",
                             "--workdir", tmp_path / "run", "--phases", "features", "--image-size", "32",
                             "--batch-size", "4", "--pipeline", "grain", "--quiet"], env=script_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not proc.stdout.readline().startswith("phase features: trainable"):  # compiling its step now
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and err == "error: interrupted; run the same command again to resume\n"
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp-" in p.name or "orbax-checkpoint-tmp" in p.name]
