"""vggjax.losses.style_transfer and examples/style_transfer.py: the book's optimisation from the content
image lowers the book's loss, whose start value equals the book's Keras code; files and flags.

A seeded random VGG19 goes through a Keras legacy h5 file (the published layout), which Keras
itself and vggjax.convert_file both read; content and style are JPEG files written here.
"""
import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

import vggjax
from book_style_transfer import book_loss, keras_vgg19
from helpers import REPO
from vggjax.utils import images
from vggjax.losses import perceptual, style_transfer
from vggjax.utils import ownership

H, W = 48, 64


@pytest.fixture(scope="module")
def setup(keras, make_variables, tmp_path_factory):
    d = tmp_path_factory.mktemp("style")
    params = make_variables("vgg19", include_top=False, seed=11, input_rms=70.0)["params"]
    keras_model = keras_vgg19(keras, params, H, W, d / "vgg19.h5")
    vggjax.convert_file("keras", "vgg19", d / "vgg19.h5", d / "weights")
    rng = np.random.default_rng(12)
    for name in ("content", "style"):  # smooth colour fields with texture, larger than H x W
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((96, 72), Image.BICUBIC), np.float32)
        img += rng.normal(0, 20 if name == "style" else 4, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{name}.jpg", quality=92)
    return keras, keras_model, vggjax.load(d / "weights"), d


def inputs(pretrained, d):
    size = style_transfer.image_size(d / "content.jpg", H)
    assert size == (H, W)  # 72x96 at height 48 keeps the aspect ratio
    return [np.asarray(pretrained.preprocess(images.load_image(d / f"{n}.jpg", size)[None]))
            for n in ("content", "style")]


def test_lbfgs_lowers_the_book_loss_from_the_books_start_value(setup):
    keras, keras_model, pretrained, d = setup
    content, style = inputs(pretrained, d)
    history = [loss for _, _, loss in style_transfer.optimise(
        pretrained.model, pretrained.variables, content, style, "book1", steps=5)]
    p = perceptual.PRESETS["book1"]
    want = book_loss(keras, keras_model, content, style, content, p.content_weight, p.style_weight,
                     p.tv_weight)["total"]
    print(f"\nbook1 step 0: vggjax {history[0]:.6g} keras {want:.6g}; after 5 L-BFGS steps {history[-1]:.6g}")
    assert abs(history[0] - want) <= 1e-5 * want
    assert len(history) == 6 and all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < 0.9 * history[0]


def test_sgd_preset_lowers_the_book2_loss(setup):
    _, _, pretrained, d = setup
    content, style = inputs(pretrained, d)
    history = [loss for _, _, loss in style_transfer.optimise(
        pretrained.model, pretrained.variables, content, style, "book2", steps=3)]
    print(f"\nbook2: {history}")
    assert history[-1] < history[0]


def test_a_loss_that_becomes_nan_stops_with_one_line(setup):
    _, _, pretrained, d = setup
    content, style = inputs(pretrained, d)
    huge = jax.tree.map(lambda a: a * 1e20, pretrained.variables)  # finite weights, overflowing features
    with pytest.raises(ValueError, match=r"^style transfer: the loss is (nan|inf) at step 0; "):
        list(style_transfer.optimise(pretrained.model, huge, content, style, "book2", steps=3))


def test_example_leaves_a_users_final_png_alone(setup, tmp_path, capsys):
    _, _, _, d = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / "final.png").write_bytes(b"the user's picture")
    rc = load_example().main(["--content", str(d / "content.jpg"), "--style", str(d / "style.jpg"),
                              "--weights", str(d / "weights"), "--out", str(out), "--steps", "1"])
    assert rc == 2 and "final.png exists and vggjax did not write it" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["final.png"]
    assert (out / "final.png").read_bytes() == b"the user's picture"


def load_example():
    spec = importlib.util.spec_from_file_location("style_transfer_example",
                                                  os.path.join(REPO, "examples", "style_transfer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_writes_images_and_loss_curve(setup, tmp_path, capsys):
    _, _, _, d = setup
    out = tmp_path / "out"
    rc = load_example().main(["--content", str(d / "content.jpg"), "--style", str(d / "style.jpg"),
                              "--weights", str(d / "weights"), "--size", str(H), "--steps", "3",
                              "--save-every", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert sorted(os.listdir(out)) == [ownership.OWNED, "final.png", "loss.png", "step_00000.png",
                                       "step_00002.png", "step_00003.png"]
    assert Image.open(out / "final.png").size == (W, H)
    assert Image.open(out / "loss.png").format == "PNG"
    first = np.asarray(Image.open(out / "step_00000.png"), np.int16)  # the content image itself
    content = images.load_image(d / "content.jpg", (H, W))
    assert np.abs(first - content).max() <= 1  # caffe round trip in float32
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "steps must be a positive integer, found 0"),
    (["--save-every", "0"], "save_every must be a positive integer, found 0"),
    (["--size", "16"], "height must be an integer >= 32, found 16"),
    (["--content", "missing.jpg"], "missing.jpg: not a readable image"),
])
def test_example_refuses_bad_flags_before_any_work(setup, tmp_path, capsys, args, message):
    _, _, _, d = setup
    given = {"--content": str(d / "content.jpg"), "--style": str(d / "style.jpg"),
             "--weights": str(d / "weights"), "--out": str(tmp_path / "out")}
    given.update(dict(zip(args[::2], args[1::2])))
    rc = load_example().main([x for kv in given.items() for x in kv])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_preset_has_a_loss_and_a_schedule_and_others_are_refused():
    assert style_transfer.SCHEDULES.keys() == perceptual.PRESETS.keys()
    assert style_transfer.check_settings("book2")["steps"] == style_transfer.SCHEDULES["book2"].steps
    with pytest.raises(ValueError, match=r"unknown style-transfer preset 'book3'; expected one of "
                                         r"\['book1', 'book2'\]"):
        style_transfer.check_settings("book3")
