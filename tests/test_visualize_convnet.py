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


def test_vgg11_weights_get_vgg11_layers_and_a_users_png_is_never_replaced(tmp_path):
    from helpers import random_variables, write_jpegs
    from vggjax import weights

    meta = dict(arch="vgg11", include_top=False, top_input="torch", preprocessing="caffe")
    weights.save(tmp_path / "vgg11", random_variables("vgg11", False, seed=0, input_rms=70.0), meta)
    image = write_jpegs(tmp_path, [(60, 80)])[0]
    out = tmp_path / "viz"
    out.mkdir()
    # VGG11's block1 has one conv: no activations_block1_conv2.png is written, so that user file is
    # no obstacle; filters_block4_conv1.png would be written, so the user's one stops the run.
    for name in ("activations_block1_conv2.png", "filters_block4_conv1.png"):
        (out / name).write_bytes(b"the user's")
    proc = run_script(SCRIPT, "--weights", tmp_path / "vgg11", "--image", image, "--out", out,
                      env=script_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "filters_block4_conv1.png exists and vggjax did not write it" in proc.stderr.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["activations_block1_conv2.png", "filters_block4_conv1.png"]
    assert all(p.read_bytes() == b"the user's" for p in out.iterdir())
