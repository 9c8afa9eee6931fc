"""examples/finetune_catsdogs.py end to end in subprocesses: --smoke learns, kill -9 resumes bit-exactly, offline stops at once."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, run_script, script_env
from vggjax import classifier, data, report, smoke
from vggjax.trees import flatten

SCRIPT = os.path.join(REPO, "examples", "finetune_catsdogs.py")
SIZE, EPOCHS = smoke.SETTINGS["image_size"], smoke.SETTINGS["epochs"]


def _run(args, env, timeout=300):
    return run_script(SCRIPT, *args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One complete `--smoke` run (the reference for the resume test too)."""
    tmp = tmp_path_factory.mktemp("smoke")
    start = time.time()
    proc = _run(["--smoke", "--workdir", str(tmp / "run")], script_env(tmp))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "run", proc.stdout, time.time() - start


def test_smoke_run_learns_in_every_phase_and_writes_its_outputs(smoke_run):
    workdir, stdout, seconds = smoke_run
    assert f"{SIZE}x{SIZE}" in stdout and "RANDOM VGG16 weights" in stdout
    results = json.loads((workdir / report.RESULTS).read_text())
    history = json.loads((workdir / report.HISTORY).read_text())
    assert list(results) == list(history) == ["features", "frozen", "finetune"]
    for phase, r in results.items():
        # Two balanced classes: chance is 0.5.
        assert r["test_accuracy"] >= 0.75 and r["final_val_accuracy"] >= 0.75, (phase, r)
        assert r["test_examples"] == 2 * smoke.SPLIT_SIZES["test"]
        assert [e["epoch"] for e in history[phase]] == list(range(1, EPOCHS[phase] + 1))
    with Image.open(workdir / report.CURVES) as png:
        assert png.format == "PNG"

    # The exported fine-tuned classifier, run on the test JPEGs from disk, scores what
    # results.json says, and its base is a weights directory with the input's layer names.
    test = data.load_split(str(workdir / "smoke_inputs" / "data"), "test", SIZE, 20, shuffle=False)
    images = np.concatenate([b["image"][b["mask"]] for b in test.batches(0)])
    clf = classifier.load_classifier(workdir / "export" / "finetune")
    accuracy = np.mean((classifier.predict(clf, images) > 0.5) == (test.labels == 1))
    assert accuracy == pytest.approx(results["finetune"]["test_accuracy"])
    assert clf.class_names == smoke.CLASSES
    print(f"smoke run: {seconds:.0f} s, test accuracy "
          + ", ".join(f"{p} {r['test_accuracy']:.3f}" for p, r in results.items()))


def test_kill_9_and_rerun_ends_bit_identical_to_the_uninterrupted_run(smoke_run, tmp_path):
    reference, _, _ = smoke_run
    workdir = tmp_path / "run"
    # Same seeded inputs; copied only to save the time of making them again.
    shutil.copytree(reference / "smoke_inputs", workdir / "smoke_inputs")
    args = ["--smoke", "--workdir", str(workdir), "--checkpoint-every", "3"]
    env = script_env(tmp_path)
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    finetune = workdir / "checkpoints" / "finetune"
    try:
        # Kill as soon as the fine-tuning phase has its first (mid-epoch) checkpoint.
        while proc.poll() is None and not (finetune.is_dir() and any(p.name.isdigit() for p in finetune.iterdir())):
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (workdir / "export" / "finetune").exists()

    resumed = _run(args, env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    out = resumed.stdout
    assert "features of 'train': reusing" in out
    assert "phase features: already finished" in out and "phase frozen: already finished" in out
    assert "phase finetune: resuming at epoch 1, batch " in out

    for name in (report.HISTORY, report.RESULTS):
        assert json.loads((workdir / name).read_text()) == json.loads((reference / name).read_text())
    want = flatten(classifier.load_classifier(reference / "export" / "finetune").variables)
    have = flatten(classifier.load_classifier(workdir / "export" / "finetune").variables)
    assert set(have) == set(want)
    different = [k for k in want if not np.array_equal(np.asarray(have[k]), np.asarray(want[k]))]
    assert different == []


def test_data_parallel_run_over_two_devices(smoke_run, tmp_path):
    reference, _, _ = smoke_run
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
    assert all(r["test_examples"] == 2 * smoke.SPLIT_SIZES["test"] for r in results.values())
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
    assert ("python tools/convert_weights.py --source keras --arch vgg16 "
            "--input vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5") in proc.stderr
    assert "--weights DIR" in proc.stderr
    assert f"--data {tmp_path / 'no_such_folder'} lacks" in proc.stderr and "--data DIR" in proc.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "converted").exists()
    assert time.time() - start < 60
