"""Shared fixtures: Keras on TensorFlow's CPU backend, seeded random VGG weights, a script environment."""
import os
import shutil
import tempfile

# Before anything imports keras: the reference framework for the Keras parity tests.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import filelock
import pytest

import helpers
from helpers import random_variables, script_env, write_vgg16


@pytest.fixture(scope="session", autouse=True)
def _temp_files_under_pytest(tmp_path_factory):
    """Temp files of the libraries under test (TF's autograph sources, tfds scratch) land in
    pytest's own temp folder, in this process and in the scripts it runs, never in the system's."""
    scratch = str(tmp_path_factory.mktemp("tmp"))
    previous = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = scratch, scratch
    yield
    tempfile.tempdir = previous[1]
    if previous[0] is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = previous[0]


@pytest.fixture(scope="session")
def make_variables():
    """`random_variables` as a fixture: make_variables("vgg16", include_top=False, seed=1)."""
    return random_variables


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on TensorFlow, GPUs hidden (imported only by the tests that compare against it)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import keras

    assert keras.backend.backend() == "tensorflow"
    return keras


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder every xdist worker of this run sees (the parent of the workers' base temps; a
    serial run's own base temp): artifacts built there once serve all test files."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(directory, build):
    """`build(directory)` by one process of this run; the others wait for it, then reuse the
    directory (tests only read it). Returns `directory`."""
    with filelock.FileLock(f"{directory}.lock"):  # the other worker waits here while one builds
        if not (directory / "complete").exists():
            shutil.rmtree(directory, ignore_errors=True)  # what a worker killed mid-build left
            directory.mkdir()
            build(directory)
            (directory / "complete").touch()
    return directory


@pytest.fixture(scope="session", autouse=True)
def _onednn_library(shared_dir):
    """The oneDNN conv library, built once per test run into a cache of its own, for the scripts'
    fresh caches (`helpers.script_env`). Not built where it cannot be (no compiler, headers or
    x86-64): then every script tries, and reports, as a user's would."""
    def build(directory):
        from vggjax.model import onednn_build

        previous = os.environ.get("VGGJAX_CACHE")
        os.environ["VGGJAX_CACHE"] = str(directory)
        try:
            onednn_build.build()
        except RuntimeError:
            pass
        finally:
            os.environ.pop("VGGJAX_CACHE") if previous is None else os.environ.update(VGGJAX_CACHE=previous)

    directory = built_once(shared_dir / "onednn_cache", build)
    helpers.ONEDNN_LIBRARY[:] = sorted((directory / "onednn").glob("onednn_conv-*.so"))[:1]


@pytest.fixture(scope="session")
def vgg16_with_top(shared_dir):
    """(legacy h5, converted dir) of `helpers.write_vgg16(seed=5, logit_scale=3.0)`: 553 MB of
    h5 plus its conversion, built once per run."""
    directory = built_once(shared_dir / "vgg16_with_top_seed5",
                           lambda d: write_vgg16(d, seed=5, logit_scale=3.0))
    return directory / "vgg16_weights_tf_dim_ordering_tf_kernels.h5", directory / "converted"


@pytest.fixture(scope="session")
def torch_vgg16_files(shared_dir):
    """`random_vgg("vgg16", seed=0)` as a torchvision .pth and as timm's model.safetensors, and
    the .pth converted by vggjax (`converted`), built once per run: the folder holding them."""
    def build(directory):
        import vggjax
        from vggjax.testing.reference import random_vgg, save_timm_safetensors
        import torch

        model = random_vgg("vgg16", seed=0)
        torch.save(model.state_dict(), directory / "vgg16.pth")
        save_timm_safetensors(model, directory / "model.safetensors")
        vggjax.convert_file("torchvision", "vgg16", directory / "vgg16.pth", directory / "converted",
                            include_top=True)

    return built_once(shared_dir / "torch_vgg16_seed0", build)


@pytest.fixture
def subprocess_env(tmp_path):
    """`helpers.script_env`: the checkout importable, a fresh $VGGJAX_CACHE (with this run's
    oneDNN conv library)."""
    return script_env(tmp_path)


def pytest_report_header(config):
    """The CPU kind of this run (the fast paths depend on it), in pytest's header."""
    from vggjax.model import cpu

    return f"vggjax CPU: {cpu.describe_cpu()}"


SLOW_TIMEOUT = 900  # s: the slow end-to-end runs (kill -9 and resume, multi-process) take minutes


def pytest_collection_modifyitems(items):
    """`slow` tests get SLOW_TIMEOUT instead of pyproject's default `timeout` (unless they set one)."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
