"""Exported classifier inference, same run: img/s of the cats-vs-dogs classifier (VGG16 base + the
book's head, 150x150, batch 32, fp32) run as each `tools/export.py` artifact (jax, onnx, savedmodel)
vs `vggjax.inference.classifier.predict` and Keras `model.predict` on the same weights.

    python -m benchmarks.bench_export [--rounds 3] [--batches 3] [--smoke] [--out F]

The weights: a Keras VGG16 (include_top=False, random He init) + Flatten/Dense(256)/Dense(1), its
base saved as a Keras 3 .weights.h5 and converted by vggjax; the head copied. Every runner's
probabilities on one batch are checked against Keras' before timing (max abs diff printed).
Each measurement runs in its own subprocess (one runtime's thread pool at a time), the runners
alternating round by round (each round starting one further on). Results go to stdout and
benchmarks/results_export.md (+ .json), with the CPU.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import harness

SIZE, BATCH = 150, 32
RUNNERS = ["keras", "vggjax", "jax", "onnx", "savedmodel"]
ENV = {"KERAS_BACKEND": "tensorflow"}


def runner(name: str, work: Path):
    """The child's predict function of runner `name`: uint8 (N, S, S, 3) -> (N,) P(class 1)."""
    if name == "keras":
        import keras
        model = keras.models.load_model(work / "keras.keras")
        return lambda x: model.predict(x, batch_size=len(x), verbose=0)[:, 0]
    if name == "vggjax":
        from vggjax.inference import classifier
        clf = classifier.load_classifier(work / "finetune")
        return lambda x: classifier.predict(clf, x, batch_size=len(x))[:, 1]
    from vggjax.inference import artifact
    art = artifact.load(work / name)
    return lambda x: art.probabilities(x)[:, 1]


def measure_main(name: str, work: Path, batches: int) -> None:
    """Child: load runner `name`, one first call (its output saved), `batches` timed calls."""
    pixels = np.load(work / "pixels.npy")
    run = runner(name, work)
    first = harness.seconds(lambda: np.save(work / f"out_{name}.npy", np.asarray(run(pixels))))
    harness.reply({"first_s": first, "img_s": len(pixels) / harness.seconds(lambda: np.asarray(run(pixels)), batches)})


def prepare(work: Path, size: int, batch: int) -> None:
    """Keras classifier, its vggjax conversion + export, the three artifacts, one uint8 batch."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    import vggjax
    from vggjax.export import artifact
    from vggjax.inference import classifier
    from vggjax.inference.heads import Head, init_classifier
    import jax

    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Flatten()(base(keras.applications.vgg16.preprocess_input(inputs)))
    dense = keras.layers.Dense(256, activation="relu")
    top = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, top(keras.layers.Dropout(0.5)(dense(x))))
    model.save(work / "keras.keras")
    base.save_weights(work / "vgg16.weights.h5")
    converted = work / "converted"
    vggjax.convert_file("keras", "vgg16", work / "vgg16.weights.h5", converted, include_top=False)
    pretrained = vggjax.load(converted)
    net, variables = init_classifier(pretrained.variables, pretrained.model, Head(units=256), size,
                                     jax.random.PRNGKey(0))
    params = dict(variables["params"])
    head = dict(params["head"])
    for name, layer in (("hidden", dense), ("logits", top)):
        kernel, bias = layer.get_weights()
        head[name] = {"kernel": kernel, "bias": bias}
    params["head"] = head
    clf = classifier.TrainedClassifier(model=net, variables={**variables, "params": params},
                                       preprocessing="caffe", image_size=size, class_names=("cats", "dogs"))
    classifier.save(work / "finetune", clf, dict(pretrained.meta))
    for fmt in ("jax", "onnx", "savedmodel"):
        artifact.export(work / "finetune", fmt, work / fmt)
    rng = np.random.default_rng(0)
    np.save(work / "pixels.npy", rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=3, help="timed batches of 32 per measurement")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    harness.arguments(p, results="results_export")
    args = p.parse_args()
    if args.measure:
        return measure_main(args.measure, args.work, args.batches)
    size, batch = (32, 2) if args.smoke else (SIZE, BATCH)
    if args.smoke:
        args.rounds, args.batches = 1, 1
    if args.rounds < 1 or args.batches < 1:
        p.error("--rounds and --batches must be >= 1")
    os.environ.update(ENV)
    log = harness.Log("Exported classifier inference")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, size, batch)
        firsts: dict = {name: [] for name in RUNNERS}

        def measure(name):
            r = harness.child("benchmarks.bench_export", "--measure", name, "--work", str(work),
                              "--batches", str(args.batches), env=ENV)
            firsts[name].append(r["first_s"])
            return 1 / r["img_s"]  # seconds per image
        times = harness.interleave({name: lambda name=name: measure(name) for name in RUNNERS},
                                   args.rounds, log, warmup=False)
        ref = np.load(work / "out_keras.npy")
        diffs = {name: float(np.abs(np.load(work / f"out_{name}.npy") - ref).max()) for name in RUNNERS}
    log.data.update(seconds_per_image={k: list(v) for k, v in times.items()}, first_s=firsts, max_abs_diff=diffs)
    log()
    log.table([f"runner (VGG16 classifier, {size}², batch {batch}, fp32)", "img/s (median)", "rounds min–max",
               "vs Keras model.predict", "first call s", "max abs diff vs Keras"],
              [[name, f"{1 / t.median:.2f}", t.spread(lambda s: 1 / s), f"{harness.speedup(times, name, 'keras'):.2f}x",
                f"{np.median(firsts[name]):.1f}", f"{diffs[name]:.1e}"] for name, t in times.items()])
    log.save(harness.out_path(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
