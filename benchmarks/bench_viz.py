"""vggjax.viz.convnet vs the references on the same VGG16 weights, interleaved in one run.

    python -m benchmarks.bench_viz [--rounds 5] [--filter-rounds 2] [--filters 64] [--skip-filters]
                                   [--style-rounds 2] [--style-steps 5] [--skip-style] [--smoke] [--out F]

1. Grad-CAM, batch 16 at 224x224, fp32, each image's top class (pre-softmax score):
   vggjax.viz.convnet.grad_cam vs pytorch-grad-cam's GradCAM on PyTorch, target layer block5_conv3
   after its ReLU (torchvision `features[29]`, the book's layer; pytorch-grad-cam's own VGG
   default is the last max-pool). pytorch-grad-cam also upsamples its maps to 224x224 (cv2),
   vggjax returns them at 14x14. Before timing, all three methods are checked against
   pytorch-grad-cam at 14x14 (its min-max scaling applied to ours).
2. The book's 8x8 sheet of filter patterns (`--filters` 64 filters of block3_conv1, 64 px, 40 steps):
   one vmapped vggjax call vs the book's per-filter loop in TF (a tf.function step, 40 steps
   a filter, as Keras' `iterate` function in the book).
3. Neural style transfer, DLwP 2nd ed. 12.3 (preset "book2": SGD on the combination image,
   VGG19 on seeded random weights, two photos of ../shared/data at the book's height 400):
   `--style-steps` steps of vggjax.losses.style_transfer.optimise vs the book's loop (a
   tf.function `compute_loss_and_grads` over the concatenated base, style and combination
   images, then the SGD update). Both losses at step 0 are checked to agree first.

Needs: torch (CPU), `pip install --no-deps grad-cam ttach` plus opencv-python-headless and
scikit-learn (its imports); torchvision is replaced by vggjax.testing.reference's stand-in (PyPI
torchvision does not import beside this torch). Writes
benchmarks/results_viz.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

import vggjax
from benchmarks import harness
from vggjax.testing import reference
from vggjax.viz import convnet

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"


def same_weights(tmp: Path):
    """A seeded torchvision-layout VGG16 and the same weights converted to vggjax."""
    import torch

    net = reference.randomize(reference.vgg("vgg16"), seed=0).eval()
    torch.save(net.state_dict(), tmp / "vgg16.pth")
    vggjax.convert_file("torchvision", "vgg16", tmp / "vgg16.pth", tmp / "converted", include_top=True)
    return net, vggjax.load(tmp / "converted")


def bench_grad_cam(net, pt, rounds: int, batch: int, log, size: int = 224) -> list[str]:
    import torch
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = pt.preprocess(pixels)
    x_torch = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    layer = [net.features[29]]  # the ReLU after features[28] = block5_conv3

    log("parity at 14x14 on 2 images (pytorch-grad-cam's min-max scaling applied to ours):")
    for method, cls in (("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("hirescam", HiResCAM)):
        with cls(model=net, target_layers=layer) as cam:
            cam.get_target_width_height = lambda _: None  # keep its maps at the layer's size
            theirs = cam(input_tensor=x_torch[:2], targets=None)
        ours = np.asarray(convnet.grad_cam(pt.model, pt.variables, x[:2], method=method))
        ours = ours - ours.min(axis=(1, 2), keepdims=True)
        ours = ours / (1e-7 + ours.max(axis=(1, 2), keepdims=True))
        log(f"  {method}: max abs difference {np.max(np.abs(ours - theirs)):.1e}")

    # pytorch-grad-cam as documented backpropagates into every weight. Kinder to it: frozen
    # weights, only the input's gradient (it needs one tensor before the layer that wants grad).
    frozen = reference.vgg("vgg16")
    frozen.load_state_dict(net.state_dict())
    frozen.eval().requires_grad_(False)
    models = {impl: pt.model.clone(conv_impl=impl) for impl in ("auto", "direct")}
    with GradCAM(model=net, target_layers=layer) as cam, \
            GradCAM(model=frozen, target_layers=[frozen.features[29]]) as cam_frozen:
        cam_frozen.compute_input_gradient = True  # BaseCAM's option; GradCAM does not pass it on
        fns = {f"vggjax ({impl} conv)": (lambda m=m: convnet.grad_cam(m, pt.variables, x))
               for impl, m in models.items()}
        fns["pytorch-grad-cam"] = lambda: cam(input_tensor=x_torch, targets=None)
        fns["pytorch-grad-cam, frozen weights"] = lambda: cam_frozen(input_tensor=x_torch, targets=None)
        log(f"Grad-CAM, batch {batch}, {size}x{size}, fp32, {rounds} interleaved rounds:")
        times = harness.interleave({name: harness.Timer(fn) for name, fn in fns.items()}, rounds, log)
    log.data["grad_cam_seconds"] = {name: list(t) for name, t in times.items()}
    return harness.table([f"Grad-CAM (batch {batch}, {size}²)", "img/s (median)", "rounds min–max s",
                          "vs pytorch-grad-cam"],
                         [[name, f"{batch / t.median:.2f}", t.spread(), f"{harness.speedup(times, name, 'pytorch-grad-cam'):.2f}x"]
                          for name, t in times.items()])


def book_loop(pt, layer: str, size: int, steps: int, n: int):
    """The book's per-filter TF loop on `pt`'s weights: a callable that draws the n-filter sheet."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import keras

    conv_base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    for lyr in conv_base.layers:
        if lyr.weights:
            lyr.set_weights([np.asarray(pt.params[lyr.name]["kernel"]),
                             np.asarray(pt.params[lyr.name]["bias"])])
    features = keras.Model(conv_base.inputs, conv_base.get_layer(layer).output)

    @tf.function
    def iterate(x, f):  # the book's K.function: loss and normalised gradient
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_mean(tf.gather(features(x), f, axis=-1))
        g = tape.gradient(loss, x)
        return loss, g / (tf.sqrt(tf.reduce_mean(tf.square(g))) + 1e-5)

    def book_sheet():
        tiles = []
        for f in range(n):
            img = np.random.random((1, size, size, 3)) * 20 + 128.0
            for _ in range(steps):
                _, g = iterate(tf.constant(img, tf.float32), tf.constant(f))
                img += g.numpy()
            tiles.append(convnet.deprocess_image(img[0]))
        return convnet.grid(np.stack(tiles))

    return book_sheet


def bench_filters(pt, rounds: int, log, layer: str = "block3_conv1", size: int = 64,
                  steps: int = 40, n: int = 64) -> list[str]:
    book_sheet = book_loop(pt, layer, size, steps, n)
    base = pt.model.clone(include_top=False)

    def ours(impl):
        return lambda: convnet.grid(convnet.filter_pattern(base.clone(conv_impl=impl), pt.variables, layer,
                                                   range(n), size=size, steps=steps))

    log(f"filter-pattern sheet: {n} filters of {layer}, {size} px, {steps} steps, {rounds} rounds:")
    times = harness.interleave({name: harness.Timer(fn) for name, fn in {
        "vggjax (auto conv)": ours("auto"), "vggjax (direct conv)": ours("direct"),
        "book loop, TF": book_sheet}.items()}, rounds, log)
    log.data["filter_sheet_seconds"] = {name: list(t) for name, t in times.items()}
    return harness.table([f"{n}-filter sheet ({layer}, {size} px, {steps} steps)", "seconds (median)",
                          "rounds min–max s", "speed-up vs TF loop"],
                         [[name, f"{t.median:.2f}", t.spread(), f"{harness.speedup(times, name, 'book loop, TF'):.2f}x"]
                          for name, t in times.items()])


STYLE_LAYERS = ["block1_conv1", "block2_conv1", "block3_conv1", "block4_conv1", "block5_conv1"]


def book_style_loop(params, content, style, preset):
    """DLwP 2nd ed. 12.3's training loop on Keras' VGG19 holding `params`: a callable that runs
    `steps` SGD steps from the content image and returns the losses."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import keras

    h, w = content.shape[1:3]
    model = keras.applications.VGG19(weights=None, include_top=False, input_shape=(h, w, 3))
    for lyr in model.layers:
        if lyr.weights:
            lyr.set_weights([np.asarray(params[lyr.name]["kernel"]), np.asarray(params[lyr.name]["bias"])])
    feature_extractor = keras.Model(model.inputs, {lyr.name: lyr.output for lyr in model.layers})

    def gram_matrix(x):
        x = tf.transpose(x, (2, 0, 1))
        features = tf.reshape(x, (tf.shape(x)[0], -1))
        return tf.matmul(features, tf.transpose(features))

    def style_loss(style_img, combination_img):
        S, C = gram_matrix(style_img), gram_matrix(combination_img)
        return tf.reduce_sum(tf.square(S - C)) / (4.0 * (3 ** 2) * ((h * w) ** 2))

    def total_variation_loss(x):
        a = tf.square(x[:, : h - 1, : w - 1, :] - x[:, 1:, : w - 1, :])
        b = tf.square(x[:, : h - 1, : w - 1, :] - x[:, : h - 1, 1:, :])
        return tf.reduce_sum(tf.pow(a + b, 1.25))

    def compute_loss(combination_image, base_image, style_reference_image):
        features = feature_extractor(tf.concat([base_image, style_reference_image, combination_image], 0))
        layer_features = features["block5_conv2"]
        loss = preset.content_weight * tf.reduce_sum(tf.square(layer_features[2] - layer_features[0]))
        for name in STYLE_LAYERS:
            loss += (preset.style_weight / len(STYLE_LAYERS)) * style_loss(features[name][1], features[name][2])
        return loss + preset.tv_weight * total_variation_loss(combination_image)

    @tf.function
    def compute_loss_and_grads(combination_image, base_image, style_reference_image):
        with tf.GradientTape() as tape:
            loss = compute_loss(combination_image, base_image, style_reference_image)
        return loss, tape.gradient(loss, combination_image)

    base, ref = tf.constant(content), tf.constant(style)

    def run(steps):
        optimizer = keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(
            initial_learning_rate=100.0, decay_steps=100, decay_rate=0.96))
        combination_image = tf.Variable(content)
        losses = []
        for _ in range(steps):
            loss, grads = compute_loss_and_grads(combination_image, base, ref)
            optimizer.apply_gradients([(grads, combination_image)])
            losses.append(float(loss))
        return losses

    return run


def bench_style(rounds: int, steps: int, log, height: int = 400) -> list[str]:
    import jax

    from vggjax.losses import perceptual, style_transfer
    from vggjax.utils import images
    from vggjax.weights.preprocessing import preprocess_input

    data = harness.DATA / "train"
    content_path, style_path = data / "cats/cat.1.jpg", data / "dogs/dog.1.jpg"
    for path in (content_path, style_path):
        if not path.is_file():
            raise SystemExit(f"style transfer: no photo at {path} (cats_and_dogs_small: set "
                             "$VGGJAX_BENCH_DATA); pass --skip-style")
    size = style_transfer.image_size(content_path, height)
    model = vggjax.create("vgg19", include_top=False)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    prep = lambda path: np.asarray(preprocess_input(images.load_image(path, size)[None].astype(np.float32),
                                                    "caffe"))
    content, style = prep(content_path), prep(style_path)
    book = book_style_loop(variables["params"], content, style, perceptual.PRESETS["book2"])

    def ours(impl):
        m = model.clone(conv_impl=impl)
        return lambda: [v for _, _, v in style_transfer.optimise(m, variables, content, style, "book2", steps)]

    log(f"style transfer (book2, VGG19, {size[0]}x{size[1]}, {steps} SGD steps a round, {rounds} rounds):")
    first = {"vggjax (auto conv)": ours("auto")(), "book loop, TF": book(steps)}
    log("  losses, first steps: " + "; ".join(f"{n} " + ", ".join(f"{v:.6g}" for v in l[:3])
                                              for n, l in first.items()))
    start_gap = abs(first["vggjax (auto conv)"][0] / first["book loop, TF"][0] - 1)
    log(f"  step-0 loss relative difference {start_gap:.1e}")
    if start_gap > 1e-3:
        raise SystemExit(f"style transfer: vggjax and the book's loop disagree at step 0 ({start_gap:.1e})")
    times = harness.interleave({name: harness.Timer(fn) for name, fn in {
        "vggjax (auto conv)": ours("auto"), "vggjax (direct conv)": ours("direct"),
        "book loop, TF": lambda: book(steps)}.items()}, rounds, log)
    log.data["style_seconds"] = {name: list(t) for name, t in times.items()}
    return harness.table([f"style transfer (book2, VGG19, {size[0]}x{size[1]})", "s/step (median)",
                          "rounds min–max s/step", "speed-up vs TF loop"],
                         [[name, f"{t.median / steps:.3f}", t.spread(lambda s: s / steps, ".3f"),
                           f"{harness.speedup(times, name, 'book loop, TF'):.2f}x"] for name, t in times.items()])


def main(argv=None) -> None:
    harness.with_hugepages()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--filter-rounds", type=int, default=2)
    p.add_argument("--filters", type=int, default=64, help="filters in the sheet")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--skip-filters", action="store_true")
    p.add_argument("--style-rounds", type=int, default=2)
    p.add_argument("--style-steps", type=int, default=5)
    p.add_argument("--skip-style", action="store_true")
    p.add_argument("--skip-grad-cam", action="store_true")
    harness.arguments(p, results="results_viz")
    a = p.parse_args(argv)
    small = {}
    if a.smoke:  # one round of each part at its smallest: Grad-CAM at 32x32, 2 filters, 1 style step
        a.rounds = a.filter_rounds = a.style_rounds = a.style_steps = a.batch = 1
        a.filters, small = 2, dict(size=32, steps=2)
    if min(a.rounds, a.filter_rounds, a.batch, a.style_rounds, a.style_steps, a.filters) < 1:
        p.error("--rounds, --filter-rounds, --filters, --batch, --style-rounds and --style-steps must be >= 1")
    import torch

    reference.install_torchvision_standin()
    log = harness.Log(f"vggjax.viz.convnet benchmark: torch {torch.__version__} ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        net, pt = same_weights(Path(tmp))
    table: list[str] = []

    def write():  # after each part, so a long filter run never loses the Grad-CAM table
        log.save(harness.out_path(a), log[:2] + table + ["", "## log", "```"] + log[2:] + ["```"])

    if not a.skip_grad_cam:
        table += bench_grad_cam(net, pt, a.rounds, a.batch, log, small.get("size", 224))
        write()
    if not a.skip_filters:
        table += [""] + bench_filters(pt, a.filter_rounds, log, n=a.filters, **small)
        write()
    if not a.skip_style:
        table += [""] + bench_style(a.style_rounds, a.style_steps, log, height=48 if a.smoke else 400)
        write()
    print("\n".join(table))


if __name__ == "__main__":
    main()
