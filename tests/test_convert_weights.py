"""tools/convert_weights.py: one success line, or 'error: ...' and exit 1 with nothing written."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vggjax
from helpers import REPO, run_on_small_disk, run_script
from vggjax.weights.keras import write_legacy_h5
from vggjax.cli import convert  # the command's main(), in-process, where a subprocess is not worth it
from vggjax.utils import ownership

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "convert_weights.py"


def run_cli(env, *args, cwd=REPO):
    return run_script(SCRIPT, *args, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def notop_params(make_variables):
    return make_variables("vgg16", include_top=False, seed=11)["params"]


@pytest.fixture
def notop_h5(notop_params, tmp_path):
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(notop_params, path)
    return path


def test_cli_converts_into_the_default_cache_dir(notop_params, notop_h5, subprocess_env):
    result = run_cli(subprocess_env, "--source", "keras", "--arch", "vgg16", "--input", str(notop_h5))
    assert result.returncode == 0, result.stderr
    out = Path(subprocess_env["VGGJAX_CACHE"]) / "converted" / "keras_vgg16_notop"
    assert result.stdout.splitlines() == [
        f"converted keras vgg16 (without top) to {out}"]
    pt = vggjax.load(out)
    assert pt.meta["source_file"] == str(notop_h5) and pt.meta["preprocessing"] == "caffe"
    for name, layer in notop_params.items():
        np.testing.assert_array_equal(pt.params[name]["kernel"], layer["kernel"])
        np.testing.assert_array_equal(pt.params[name]["bias"], layer["bias"])


@pytest.mark.parametrize("damage, extra, pattern", [
    (lambda path: None, ["--include-top"], "holds no classifier"),
    (lambda path: path.write_bytes(b""), [], "is empty (0 bytes)"),
], ids=["notop-file-with-include-top", "empty-file"])
def test_cli_error_is_one_line_without_traceback(notop_h5, tmp_path, subprocess_env, damage, extra,
                                                 pattern):
    damage(notop_h5)
    out = tmp_path / "out"
    result = run_cli(subprocess_env, "--source", "keras", "--arch", "vgg16", "--input",
                     str(notop_h5), "--output", str(out), *extra)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and pattern in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()


def test_cli_runs_from_anywhere_and_timm_needs_input(subprocess_env, tmp_path):
    """No PYTHONPATH and another working dir: the script finds its checkout by itself when
    vggjax is not installed (and uses the installed one when it is)."""
    env = {k: v for k, v in subprocess_env.items() if k != "PYTHONPATH"}
    result = run_cli(env, "--source", "timm", "--arch", "vgg16", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no Hub commit is pinned for timm vgg16 in vggjax: give one with --revision SHA")
    assert "--input FILE" in result.stderr and "Traceback" not in result.stderr


def test_cli_refuses_to_overwrite_without_flag(notop_h5, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--source", "keras", "--arch", "vgg16", "--input", str(notop_h5), "--output", str(out)]
    assert convert.main(args) == 0
    assert convert.main(args) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert convert.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([notop_h5.name, "out", ownership.OWNED])


def convert_args(h5, out, *extra):
    return ["--source", "keras", "--arch", "vgg16", "--input", str(h5), "--output", str(out), *extra]


def test_overwrite_keeps_user_folders_the_input_and_the_working_directory(notop_h5, tmp_path,
                                                                          subprocess_env):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "vggjax.json").write_text("{}")  # a vggjax name proves nothing: content does
    cases = [
        (mine, tmp_path, r"mine holds files vggjax did not write \(mine/notes.txt, mine/vggjax.json\), "
                         r"so --overwrite will not delete it"),
        (notop_h5.parent, tmp_path, r"contains .*; refusing to replace it"),  # the cwd and the input
        (".", mine, r"mine contains .*mine; refusing to replace it"),
    ]
    for output, cwd, pattern in cases:
        result = run_cli(subprocess_env, *convert_args(notop_h5, output, "--overwrite"), cwd=cwd)
        assert result.returncode == 1, result.stdout
        assert re.fullmatch(rf"error: .*{pattern}.*\n", result.stderr), result.stderr
    assert (mine / "notes.txt").read_text() == "mine" and notop_h5.is_file()
    # Nothing written beside them ("cache": the script's $VGGJAX_CACHE, helpers.script_env).
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", "mine", notop_h5.name])


def test_overwrite_refuses_a_vggjax_output_the_user_added_a_file_to(notop_h5, tmp_path, subprocess_env):
    out = tmp_path / "out" / "mixed"
    assert run_cli(subprocess_env, *convert_args(notop_h5, out)).returncode == 0
    (out / "thesis.tex").write_text("years of work")
    result = run_cli(subprocess_env, *convert_args(notop_h5, out, "--overwrite"))
    assert result.returncode == 1 and re.fullmatch(
        r"error: .*mixed holds files vggjax did not write \(mixed/thesis.tex\), so --overwrite will "
        r"not delete it; choose another output directory\n", result.stderr), result.stderr
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "vggjax.json").is_file()
    (out / "thesis.tex").unlink()
    assert run_cli(subprocess_env, *convert_args(notop_h5, out, "--overwrite")).returncode == 0


def test_a_symlinked_output_and_a_directory_input_are_refused_before_work(notop_h5, tmp_path,
                                                                          subprocess_env):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = run_cli(subprocess_env, *convert_args(notop_h5, tmp_path / "link"))
    assert result.returncode == 1 and re.fullmatch(r"error: .*link is a symbolic link; vggjax does not "
                                                   r"replace links: give the real path\n", result.stderr)
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "real").iterdir()) == []
    result = run_cli(subprocess_env, *convert_args(tmp_path / "real", tmp_path / "out"))
    assert result.returncode == 1 and re.fullmatch(r"error: --input .*real is a directory; expected a "
                                                   r"weights file .*\n", result.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "kill-9"])
def test_an_interrupted_conversion_leaves_nothing_after_the_next_run(notop_h5, tmp_path, subprocess_env, sig):
    out = tmp_path / "converted" / "out"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *convert_args(notop_h5, out)], env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.parent.glob(".out.tmp-*/*")):  # Orbax has begun writing the checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig != signal.SIGKILL:  # even while Orbax's threads write: no abort, no traceback
        assert proc.returncode == 128 + sig and list(out.parent.iterdir()) == []
        assert proc.stderr.read() == "error: interrupted; nothing was written\n"
    else:  # kill -9 cannot clean up: the next conversion beside it does
        assert [p.name.startswith(".out.tmp-") for p in out.parent.iterdir()] == [True]
        result = run_cli(subprocess_env, *convert_args(notop_h5, out))
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in out.parent.iterdir()) == [ownership.OWNED, "out"]


def test_a_full_disk_is_one_line_and_leaves_nothing_nor_harms_the_previous_output(notop_h5, tmp_path,
                                                                               subprocess_env):
    disk = tmp_path / "disk"
    out = disk / "out"
    convert = [sys.executable, SCRIPT, *convert_args(notop_h5, out)]
    fresh, done, again = run_on_small_disk(disk, [
        ("2m", convert), ("80m", convert), ("80m", [*convert, "--overwrite"])],
        subprocess_env)  # 58 MB of weights: a second copy, before the first is replaced, does not fit
    assert done["rc"] == 0 and done["left"][0] == ownership.OWNED, done["stderr"]
    for failed, outcome in ((fresh, []), (again, done["left"])):  # the previous output as it was
        assert failed["rc"] == 1 and failed["stderr"] == (
            f"error: no space left on device while writing {out}; nothing was written: free some "
            "space or choose another place\n")
        assert failed["left"] == outcome


@pytest.mark.parametrize("args, message", [
    (["--source", "keras", "--input", "m.keras"], "importing a model as a classifier needs --input FILE and --output DIR"),
    (["--source", "keras", "--arch", "vgg16", "--preprocess", "rescale"],
     "--preprocess only apply to importing a whole Keras model"),
    (["--source", "torchvision", "--input", "f.pth", "--output", "o", "--class-names", "a,b"],
     "--source torchvision needs --arch"),
    (["--source", "torchvision", "--arch", "vgg16", "--input", "f.pth", "--output", "o", "--class-names",
      "a,b", "--preprocess", "caffe"], "--preprocess only apply to importing a whole Keras model"),
    (["--source", "keras", "--input", "m.h5", "--output", "o", "--include-top"],
     "--include-top is for weights; a classifier import keeps the model's head"),
    (["--source", "keras", "--arch", "vgg16", "--revision", "0" * 40], "--revision is for --source timm"),
])
def test_classifier_import_flags_are_checked_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        convert.main(args)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_class_names_come_from_a_list_or_a_file(tmp_path):
    from vggjax.inference.imported import parse_class_names

    assert parse_class_names("cats, dogs") == ("cats", "dogs")
    (tmp_path / "names.txt").write_text("cats\ndogs\n\n")
    assert parse_class_names(str(tmp_path / "names.txt")) == ("cats", "dogs")
    with pytest.raises(ValueError, match=r"--class-names 'a,a': expected distinct names"):
        parse_class_names("a,a")


def test_a_conversion_shows_its_steps_on_stderr_and_quiet_removes_them(notop_h5, tmp_path, subprocess_env):
    shown = run_cli(subprocess_env, *convert_args(notop_h5, tmp_path / "a"))
    quiet = run_cli(subprocess_env, *convert_args(notop_h5, tmp_path / "b", "--quiet"))
    assert shown.returncode == quiet.returncode == 0, shown.stderr + quiet.stderr
    assert re.fullmatch(rf"converting {notop_h5.name}: 100%\|##########\| 2/2 \[.*step.*\]\n", shown.stderr)
    assert quiet.stderr == "" and quiet.stdout == shown.stdout.replace(str(tmp_path / "a"), str(tmp_path / "b"))
