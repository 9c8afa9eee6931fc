"""Exported classifier inference, same run: img/s of the cats-vs-dogs classifier (VGG16 base + the
book's head, 150x150, batch 32, fp32) run as each `tools/export.py` artifact (jax, onnx, savedmodel)
vs `vggjax.inference.classifier.predict` and Keras `model.predict` on the same weights.

    python benchmarks/bench_export.py [--rounds 3] [--batches 3]

The weights: a Keras VGG16 (include_top=False, random He init) + Flatten/Dense(256)/Dense(1), its
base saved as a Keras 3 .weights.h5 and converted by vggjax; the head copied. Every runner's
probabilities on one batch are checked against Keras' before timing (max abs diff printed).
Each measurement runs in its own subprocess (one runtime's thread pool at a time), the runners
alternating round by round. Results go to stdout and benchmarks/results_export.md, with the CPU.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE, BATCH = 150, 32
RUNNERS = ["keras", "vggjax", "jax", "onnx", "savedmodel"]
CHILD = """
import json, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
name, work, batches = {name!r}, {work!r}, {batches}
pixels = np.load(work + "/pixels.npy")
if name == "keras":
    import keras
    model = keras.models.load_model(work + "/keras.keras")
    run = lambda x: model.predict(x, batch_size=len(x), verbose=0)[:, 0]
elif name == "vggjax":
    from vggjax.inference import classifier
    clf = classifier.load_classifier(work + "/finetune")
    run = lambda x: classifier.predict(clf, x, batch_size=len(x))
else:
    from vggjax.inference import artifact
    art = artifact.load(work + "/" + name)
    run = lambda x: art.probabilities(x)[:, 1]
t0 = time.perf_counter()
first = np.asarray(run(pixels))
t1 = time.perf_counter()
for _ in range(batches):
    np.asarray(run(pixels))
t2 = time.perf_counter()
np.save(work + "/out_" + name + ".npy", first)
print(json.dumps({{"first_s": t1 - t0, "img_s": batches * len(pixels) / (t2 - t1)}}))
"""


def prepare(work: Path) -> None:
    """Keras classifier, its vggjax conversion + export, the three artifacts, one uint8 batch."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    import vggjax
    from vggjax.export import artifact
    from vggjax.inference import classifier
    from vggjax.inference.classifier import Head, init_classifier
    import jax

    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Flatten()(base(keras.applications.vgg16.preprocess_input(inputs)))
    dense = keras.layers.Dense(256, activation="relu")
    top = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, top(keras.layers.Dropout(0.5)(dense(x))))
    model.save(work / "keras.keras")
    base.save_weights(work / "vgg16.weights.h5")
    converted = work / "converted"
    vggjax.convert_file("keras", "vgg16", work / "vgg16.weights.h5", converted, include_top=False)
    pretrained = vggjax.load(converted)
    net, variables = init_classifier(pretrained.variables, pretrained.model, Head(units=256), SIZE,
                                     jax.random.PRNGKey(0))
    params = dict(variables["params"])
    head = dict(params["head"])
    for name, layer in (("hidden", dense), ("logits", top)):
        kernel, bias = layer.get_weights()
        head[name] = {"kernel": kernel, "bias": bias}
    params["head"] = head
    clf = classifier.TrainedClassifier(model=net, variables={**variables, "params": params},
                                       preprocessing="caffe", image_size=SIZE, class_names=("cats", "dogs"))
    classifier.export(work / "finetune", clf, dict(pretrained.meta))
    for fmt in ("jax", "onnx", "savedmodel"):
        artifact.export(work / "finetune", fmt, work / fmt)
    rng = np.random.default_rng(0)
    np.save(work / "pixels.npy", rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8))


def measure(name: str, work: Path, batches: int) -> dict:
    code = CHILD.format(repo=str(REPO), name=name, work=str(work), batches=batches)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name}: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    flags = subprocess.run("grep -o -w -E 'amx_bf16|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | xargs",
                           shell=True, capture_output=True, text=True).stdout.strip()
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    return f"CPU: {model}, {os.cpu_count()} cores, flags {flags}; load average {os.getloadavg()[0]:.1f} at start"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=3, help="timed batches of 32 per measurement")
    args = p.parse_args()
    lines = [cpu_line(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        rates: dict = {name: [] for name in RUNNERS}
        firsts: dict = {name: [] for name in RUNNERS}
        for r in range(args.rounds):
            for name in RUNNERS:
                res = measure(name, work, args.batches)
                rates[name].append(res["img_s"])
                firsts[name].append(res["first_s"])
                print(f"round {r}: {name} {res['img_s']:.2f} img/s (first call {res['first_s']:.1f} s)", flush=True)
        ref = np.load(work / "out_keras.npy")
        diffs = {name: float(np.abs(np.load(work / f"out_{name}.npy") - ref).max()) for name in RUNNERS}
    keras_rate = statistics.median(rates["keras"])
    lines += ["| runner (VGG16 classifier, 150², batch 32, fp32) | img/s (median) | rounds min–max | vs Keras "
              "model.predict | first call s | max abs diff vs Keras |", "|---|---|---|---|---|---|"]
    for name in RUNNERS:
        med = statistics.median(rates[name])
        lines.append(f"| {name} | {med:.2f} | {min(rates[name]):.2f}–{max(rates[name]):.2f} | "
                     f"{med / keras_rate:.2f}x | {statistics.median(firsts[name]):.1f} | {diffs[name]:.1e} |")
    text = "\n".join(lines)
    print(text)
    (REPO / "benchmarks" / "results_export.md").write_text(
        "# Exported classifier inference (benchmarks/bench_export.py)\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
