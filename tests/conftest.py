"""Shared fixtures: Keras on TensorFlow's CPU backend, seeded random VGG weights, a script environment."""
import os
import tempfile

# Before anything imports keras: the reference framework for the Keras parity tests.
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from helpers import random_variables, script_env


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


@pytest.fixture
def subprocess_env(tmp_path):
    """`helpers.script_env`: the checkout importable, an empty $VGGJAX_CACHE."""
    return script_env(tmp_path)


def pytest_report_header(config):
    """The CPU kind of this run (the fast paths depend on it), in pytest's header."""
    from vggjax.model import onednn

    return f"vggjax CPU: {onednn.describe_cpu()}"
