"""examples/visualize_convnet.py as a user runs it: the smoke run's PNGs, and one-line errors."""
from PIL import Image

from helpers import run_script, script_env

SCRIPT = "examples/visualize_convnet.py"


def test_smoke_writes_the_books_figures(tmp_path):
    out = tmp_path / "viz"
    proc = run_script(SCRIPT, "--smoke", "--out", out, env=script_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(["smoke_input.png", "gradcam.png",
                            *(f"activations_{n}.png" for n in ("block1_conv1", "block1_conv2", "block2_conv1", "block3_conv1")),
                            *(f"filters_{n}.png" for n in ("block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1"))])
    with Image.open(out / "gradcam.png") as cam:
        assert cam.mode == "RGB" and cam.size == (240, 180)  # the picture's size


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    env = script_env(tmp_path)
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    cases = [
        (["--weights", tmp_path / "missing", "--image", "x.jpg", "--out", tmp_path / "a"], "no such checkpoint directory"),
        (["--smoke", "--out", mine], "exists and is not a directory"),
        (["--smoke", "--weights", tmp_path, "--out", tmp_path / "b"], "drop --weights/--image"),
        (["--weights", tmp_path, "--out", tmp_path / "c"], "give --weights and --image"),
    ]
    for args, message in cases:
        proc = run_script(SCRIPT, *args, env=env, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert mine.read_text() == "my notes"
    assert not any((tmp_path / d).exists() for d in "abc")
