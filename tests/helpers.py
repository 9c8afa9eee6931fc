"""What several test files share: seeded random weights (the library's `random_variables`) and
images, a converted Keras VGG16 with JPEGs, the parity assertion, and running the repo's scripts as
a user would (a subprocess with its own cache), on a disk that fills up."""
import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
from PIL import Image

import vggjax
from vggjax.weights.keras import write_legacy_h5
from vggjax.weights.random_weights import CAFFE_INPUT_RMS, random_variables  # tests import them from here


@contextlib.contextmanager
def logged():
    """The messages vggjax logs (logger "vggjax", INFO and up) inside the block, as a list."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vggjax")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def tensorboard_scalars(logdir) -> dict:
    """{run: {tag: [(step, value), ...]}} of the event files under `logdir` (one run per
    subfolder, as Keras lays them out), read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for run in sorted(p for p in Path(logdir).iterdir() if p.is_dir()):
        events = EventAccumulator(str(run))
        events.Reload()
        runs[run.name] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                          for tag in events.Tags()["scalars"]}
    return runs


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # fp32 max abs error against the reference frameworks (probabilities, logits, features)


def block_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 RGB (n, size, size, 3) made of random 7x7 colour blocks: unlike pixel noise, each
    image has its own content, so the predictions differ between images."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, 7, 7, 3), dtype=np.uint8)
    reps = -(-size // 7)
    return blocks.repeat(reps, axis=1).repeat(reps, axis=2)[:, :size, :size]


def normal_images(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) float32 NHWC, as if already preprocessed (zero mean, unit variance)."""
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def assert_parity(what: str, ours, theirs, tol: float = TOL, top1: bool = True) -> None:
    """Max abs error of `ours` against the reference `theirs` within `tol`, and (for 2-D scores
    with `top1`) the same argmax per row. Prints the error (pytest -s shows it)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    err = float(np.max(np.abs(ours - theirs)))
    print(f"\nparity {what}: max abs error {err:.2e} (reference std {theirs.std():.2f}, "
          f"max |value| {np.abs(theirs).max():.3g})")
    assert err <= tol, f"{what}: max abs error {err:.2e} > {tol:.0e}"
    if top1 and ours.ndim == 2:
        np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1), err_msg=f"{what}: top-1 differs")


# The oneDNN conv library this test run built once (conftest's `_onednn_library`), None where it
# cannot be built. Fresh caches get a hard link to it: a cold build is ~7 s of g++ per script.
ONEDNN_LIBRARY: list[Path] = []


def script_env(tmp_path, onednn_built: bool = True, **extra) -> dict:
    """Environment for running a repo script in a subprocess: the checkout importable even when
    vggjax is not installed, quiet TensorFlow, a fresh $VGGJAX_CACHE under `tmp_path` holding
    only the oneDNN conv library this run built (`onednn_built=False`: empty, for the tests of
    that build itself)."""
    cache = tmp_path / "cache"
    env = dict(os.environ, VGGJAX_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if onednn_built and ONEDNN_LIBRARY and not (cache / "onednn" / ONEDNN_LIBRARY[0].name).exists():
        (cache / "onednn").mkdir(parents=True, exist_ok=True)
        try:
            os.link(ONEDNN_LIBRARY[0], cache / "onednn" / ONEDNN_LIBRARY[0].name)
        except OSError:  # another file system
            shutil.copy2(ONEDNN_LIBRARY[0], cache / "onednn" / ONEDNN_LIBRARY[0].name)
    return env


def run_script(script: str, *args, env: dict, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <repo>/<script> args...` to completion, output captured as text."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_vgg16(directory: Path, seed: int = 0,
                logit_scale: float = 1.0) -> tuple[dict, Path, Path]:
    """(params, legacy h5 path, converted weights dir) of a VGG16 with top (553 MB of h5)."""
    params = random_variables("vgg16", include_top=True, seed=seed, input_rms=CAFFE_INPUT_RMS,
                              logit_scale=logit_scale)["params"]
    h5 = directory / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    write_legacy_h5(params, h5, names="keras1")
    converted = directory / "converted"
    vggjax.convert_file("keras", "vgg16", h5, converted, include_top=True)
    return params, h5, converted


def write_jpegs(directory: Path, sizes, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields with a few bright discs) of (height, width) `sizes`."""
    rng = np.random.default_rng(seed)
    paths = []
    for k, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([128 + 100 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(1, 7) * yy
                                           + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.2) * max(h, w)
            img[(np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r] = \
                rng.integers(0, 256, 3)
        path = directory / f"photo{k}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _mounter(mount: Path) -> list[str]:
    """The command prefix that runs a shell allowed to mount a tmpfs at `mount`: a private mount
    namespace (`unshare -rm`, nothing outside sees it), or, as root without one, the plain shell
    (the script unmounts). pytest.skip, naming why, where neither can."""
    import pytest

    probe = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mount))}"
    why = "unshare is not installed"
    if shutil.which("unshare"):
        found = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True, text=True)
        if found.returncode == 0:
            return ["unshare", "-rm"]
        why = f"unshare -rm: {found.stderr.strip()}"
    if os.geteuid() == 0 and subprocess.run(["sh", "-c", f"{probe} && umount {shlex.quote(str(mount))}"],
                                            capture_output=True).returncode == 0:
        return []
    pytest.skip(f"cannot mount a small tmpfs to fill ({why}; and not root)")


def run_on_small_disk(mount: Path, steps, env: dict, timeout: float = 300) -> list[dict]:
    """Run each (size, argv) of `steps` in turn with a tmpfs of that size ("100k", "2m") at
    `mount` (the size changed in place between steps, the files kept): a disk that really
    fills up. Per step: {"rc", "stdout", "stderr", "left": the paths under `mount` after it}."""
    mount.mkdir(parents=True, exist_ok=True)
    results = mount.parent / f"{mount.name}-results"
    results.mkdir()
    prefix = _mounter(mount)
    m, lines = shlex.quote(str(mount)), []
    for i, (size, argv) in enumerate(steps):
        out = shlex.quote(str(results / str(i)))
        remount = f"mount -t tmpfs -o size={size} tmpfs {m}" if i == 0 else \
            f"mount -o remount,size={size} {m}"
        lines += [f"{remount} || exit 99", f"{shlex.join(map(str, argv))} >{out}.out 2>{out}.err",
                  f"echo $? >{out}.rc", f"(cd {m} && find . -mindepth 1 | sort) >{out}.left"]
    if not prefix:  # the plain shell's mount is the machine's: taken down however the script ends
        lines.insert(0, f"trap 'umount {m}' EXIT")
    proc = subprocess.run([*prefix, "sh", "-c", "\n".join(lines)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [{"rc": int((results / f"{i}.rc").read_text()), "stdout": (results / f"{i}.out").read_text(),
             "stderr": (results / f"{i}.err").read_text(),
             "left": [p[2:] for p in (results / f"{i}.left").read_text().splitlines()]}
            for i in range(len(steps))]


def recorded_steps(directory) -> set[int]:
    """The checkpoint steps in `directory` that vggjax saved and recorded (vggjax.train.checkpoint:
    one killed between Orbax's write and its record is removed on resume, never resumed from)."""
    from vggjax.utils import ownership

    entry = ownership.recorded(directory) if os.path.isdir(directory) else None
    return {int(rel.split("/")[0]) for rel in (entry or {"files": {}})["files"] if rel.split("/")[0].isdigit()}


def write_dir(final, **kwargs) -> None:
    """A small output directory written the way vggjax writes one (`atomic.writing`, recorded)."""
    from vggjax.utils import atomic
    with atomic.writing(final, directory=True, **kwargs) as tmp:
        tmp.mkdir()
        (tmp / "vggjax.json").write_text("{}")
        (tmp / "data.bin").write_bytes(b"new")
