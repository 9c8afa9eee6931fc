"""The installed `vggjax` command (vggjax/cli): its subcommands, its error lines, and (slow) the wheel
installed with pip into a fresh venv outside the checkout, converting and exporting with it."""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from helpers import REPO
from vggjax.cli import errors, main
from vggjax.utils import atomic
from vggjax.weights.keras import write_legacy_h5


def test_vggjax_lists_its_commands_and_refuses_others(capsys):
    with pytest.raises(SystemExit) as end:
        main.main([])
    assert end.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vggjax {convert,predict,export,finetune} ...") and "  predict   classify" in out
    assert "  finetune  the book's transfer learning" in out
    with pytest.raises(SystemExit) as end:
        main.main(["convertt"])
    assert end.value.code == 2 and capsys.readouterr().err.endswith("vggjax: error: unknown command 'convertt'\n")
    with pytest.raises(SystemExit) as end:
        main.main(["convert", "--help"])
    assert end.value.code == 0 and capsys.readouterr().out.startswith("usage: vggjax convert [-h] --source")
    for command, flag in (("predict", "--top"), ("finetune", "--epochs")):  # the error names no function
        with pytest.raises(SystemExit) as end:
            main.main([command, flag, "abc"])
        assert end.value.code == 2 and "invalid" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as end:
        main.main(["finetune", "--help"])
    assert end.value.code == 0 and capsys.readouterr().out.startswith("usage: vggjax finetune [-h] [--weights DIR]")


def test_a_command_names_its_flag_where_the_library_names_its_argument(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(atomic.RefusedError) as refused:
        with atomic.writing(tmp_path / "out", directory=True):
            pass
    assert str(refused.value).endswith("already exists and is not empty; pass overwrite=True to replace it")
    assert errors.error_line(refused.value) == (
        f"error: {tmp_path / 'out'} already exists and is not empty; add --overwrite to replace it")


OUTSIDE = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no checkout on the path


def pip(python, *args):
    result = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], env=OUTSIDE,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # pip downloads JAX, Flax, Orbax, onnxruntime, ... into a fresh venv
def test_the_wheel_gives_the_command_and_its_onnx_extra(tmp_path, make_variables):
    """pip install vggjax (core) in a fresh venv: `vggjax convert` converts a small file from outside
    the checkout; then the README's one command for ONNX makes `vggjax export --format onnx` work."""
    pip(sys.executable, "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), REPO)
    (wheel,) = (tmp_path / "dist").glob("vggjax-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    pip(python, "install", "-q", str(wheel))
    h5 = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(make_variables("vgg16", include_top=False)["params"], h5)
    env = dict(OUTSIDE, VGGJAX_CACHE=str(tmp_path / "cache"))  # the installed vggjax only
    command = str(tmp_path / "venv" / "bin" / "vggjax")

    def run(*args):
        return subprocess.run([command, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)

    result = run("convert", "--source", "keras", "--arch", "vgg16", "--input", str(h5), "--output", "vgg16")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"converted keras vgg16 (without top) to {tmp_path / 'vgg16'}\n"
    assert run("--version").stdout.startswith("vggjax ")
    onnx = ["export", "vgg16", "--format", "onnx", "--output", "vgg16-onnx", "--image-size", "32"]
    result = run(*onnx)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    install = re.search(r"pip install 'vggjax(\[\w+\])'", result.stderr)  # the one pip command it names
    assert install and install.group(0) in Path(REPO, "README.md").read_text(), result.stderr
    pip(python, "install", "-q", str(wheel) + install.group(1))
    result = run(*onnx)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr  # onnx_ir's "Skipping serialization" lines
    assert (tmp_path / "vgg16-onnx" / "model.onnx").is_file()
