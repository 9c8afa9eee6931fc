"""bf16 vs fp32 on real photos: VGG16 with its top, logits' relative error and top-1 agreement.

    python -m benchmarks.bf16_parity [--images 4000] [--batch 32] [--smoke] [--out F]

Real ImageNet weights cannot be downloaded here, so the model has seeded random weights
(He-initialised convs, the classifier scaled so that logits spread like a trained model's);
the photos are ../shared/data/cats_and_dogs_small (all splits; --data), resized to 224x224 and
caffe-preprocessed. Reported per precision/impl against fp32 "direct": the largest
|logits - reference| over max|reference| of each batch, and the share of equal top-1 classes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import vggjax
from benchmarks import harness
from vggjax.model.vgg import init_random
from vggjax.weights.preprocessing import preprocess_input


def photos(root: Path, limit: int):
    files = sorted(Path(root).glob("*/*/*.jpg"))
    files = files[::max(1, len(files) // limit)][:limit]  # spread over splits and classes
    if not files:
        raise SystemExit(f"no photos under {root} (<split>/<class>/*.jpg); pass --data")
    return files


def load(files) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR))
                     for f in files]).astype(np.float32)


RUNS = {"fp32 auto": {}, "bf16 auto": dict(dtype=jnp.bfloat16), "bf16 direct": dict(
    dtype=jnp.bfloat16, conv_impl="direct")}


def models(runs: dict):
    """(variables, {"ref": fp32 direct logits fn, run name: that run's logits fn}), all jitted
    f(variables, x) -> float32 (N, 1000), VGG16 with top, random weights."""
    ref_model = vggjax.create("vgg16", classifier_activation=None)
    variables = init_random(ref_model)
    # Scale the classifier so logits spread over several units, as a trained model's do
    # (Flax's default init leaves them nearly equal, and top-1 would be a coin toss).
    params = dict(variables["params"])
    params["predictions"] = dict(params["predictions"], kernel=params["predictions"]["kernel"] * 8)
    fns = {"ref": jax.jit(lambda v, x: ref_model.apply(v, x))}
    for name, kw in runs.items():
        m = vggjax.create("vgg16", classifier_activation=None, **{"conv_impl": "auto", **kw})
        fns[name] = jax.jit(lambda v, x, m=m: m.apply(v, x).astype(jnp.float32))
    return {"params": params}, fns


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", default=str(harness.DATA), help="cats_and_dogs_small folder")
    p.add_argument("--runs", default="fp32 auto,bf16 auto,bf16 direct",
                   help="comma-separated subset of: fp32 auto, bf16 auto, bf16 direct")
    harness.arguments(p, results=None)
    a = p.parse_args(argv)
    if a.smoke:  # 4 photos (generated JPEGs where the photos are absent)
        a.images, a.batch = 4, 2
        if not Path(a.data).is_dir():
            a.data = harness.image_folder(2)[0]
    if a.images < 1 or a.batch < 1:
        p.error("--images and --batch must be >= 1")
    wanted = [r.strip() for r in a.runs.split(",")]
    if not wanted or set(wanted) - set(RUNS):
        p.error(f"--runs: expected names from {list(RUNS)}, found {a.runs!r}")
    runs = {name: RUNS[name] for name in wanted}
    variables, fns = models(runs)
    files = photos(a.data, a.images)
    err = {n: 0.0 for n in runs}
    agree = {n: 0 for n in runs}
    near = {n: 0 for n in runs}  # disagreements whose fp32 top-2 margin is below that run's error
    ties = {n: 0 for n in runs}  # images whose fp32 top-2 margin is below that run's error
    for i in range(0, len(files), a.batch):
        x = preprocess_input(jnp.asarray(load(files[i:i + a.batch])), "caffe")
        ref = np.asarray(fns["ref"](variables, x))
        for name in runs:
            got = np.asarray(fns[name](variables, x))
            err[name] = max(err[name], float(np.abs(got - ref).max() / np.abs(ref).max()))
            agree[name] += int((got.argmax(-1) == ref.argmax(-1)).sum())
            # A near-tie: the two best fp32 logits are closer than the largest error this
            # precision makes on this image, so either order is within its rounding.
            top2 = np.sort(ref, axis=-1)[:, -2:]
            close = (top2[:, 1] - top2[:, 0]) < np.abs(got - ref).max(-1)
            ties[name] += int(close.sum())
            near[name] += int((close & (got.argmax(-1) != ref.argmax(-1))).sum())
        print(f"{min(i + a.batch, len(files))}/{len(files)}", end="\r", file=sys.stderr)
    log = harness.Log("bf16 vs fp32 on real photos")
    log(f"{len(files)} photos, VGG16 with top at 224x224, random weights; against fp32 'direct':\n")
    log.data.update(photos=len(files), max_relative_error=err, top1_agree=agree, near_ties=near, ties=ties)
    log.table(["run", "max relative logit error", "top-1 agreement", "differ", "of them near-ties",
               "images with a fp32 top-2 margin below the error"],
              [[name, f"{err[name]:.2e}", f"{100 * agree[name] / len(files):.2f}%", len(files) - agree[name],
                near[name], ties[name]] for name in runs])
    log.save(harness.out_path(a))


if __name__ == "__main__":
    main()
