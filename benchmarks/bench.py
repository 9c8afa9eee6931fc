"""vggjax vs Keras/TF vs PyTorch on the same VGG16 work, measured round-robin in one run.

    python -m benchmarks.bench [--rounds 3] [--quick] [--tasks infer150,finetune,...] [--smoke] [--out F]

Each framework runs in its own worker process (so their thread pools never overlap: only one
worker computes at a time), and every round visits every worker in turn, so a slow spell of
this shared machine hits all of them alike. Reported: median img/s over the rounds, its ratio
to Keras and PyTorch, and the first call's extra seconds (tracing + compilation) apart.

Tasks (fp32, and bf16 for the "-bf16" frameworks; VGG16 with random He-initialised weights, uint8 images in, the caffe
preprocessing inside each framework's step):
  infer150 / infer224  conv base forward, batch 32
  finetune             train step, block5 + the book's head trainable, RMSprop, 150x150, batch 20
  frozen               train step, head only trainable, 150x150, batch 20
  pipeline             vggjax.train.data decode+resize (tf.data) + vggjax.train.augmentation on a folder
  memory               peak RSS of vggjax.train.feature_cache.extract for a growing number of images
Writes benchmarks/results.json and benchmarks/results.md. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time

from benchmarks import harness

THREADS = os.cpu_count() or 1
STEP_TASKS = {
    "infer150": dict(kind="infer", size=150, batch=32),
    "infer224": dict(kind="infer", size=224, batch=32),
    "finetune": dict(kind="train", size=150, batch=20, trainable="block5+head", lr=1e-5),
    "frozen": dict(kind="train", size=150, batch=20, trainable="head", lr=2e-5),
}
# "vggjax" is conv_impl="auto", "vggjax-<impl>" another conv_impl. A "-bf16" suffix computes in
# bf16 with fp32 parameters, optimizer state and loss: vggjax compute_dtype=bfloat16 (the
# workflow's precision="bf16"), Keras mixed_bfloat16, torch autocast(bfloat16) + channels_last;
# bf16 rows are compared with the bf16 peers.
FRAMEWORKS = ("vggjax", "vggjax-direct", "keras", "keras-jax", "torch",
              "vggjax-bf16", "keras-bf16", "keras-jax-bf16", "torch-bf16")
# The book's run (Deep Learning with Python, ch. 5.3) at 150x150: 2000 training, 1000 validation
# and 1000 test images; features: one conv-base pass over all three splits; frozen and
# finetune: their epochs, each a training pass and a validation pass, and a test pass at the end.
BOOK = dict(train=2000, validation=1000, test=1000, frozen_epochs=30, finetune_epochs=100)


def synthetic_batch(size: int, batch: int, seed: int = 0):
    """uint8 (B, S, S, 3) images and int32 (B,) 0/1 labels, the same for every framework."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            rng.integers(0, 2, (batch,)).astype(np.int32))


# --------------------------------------------------------------------------- workers
class JaxWorker:
    """vggjax through its own library code: feature_cache.make_extract_step, classifier, freezing,
    steps.make_train_step; `impl` is the VGG conv_impl."""

    def __init__(self, impl: str, bf16: bool = False):
        import jax
        import jax.numpy as jnp
        self.jax, self.impl = jax, impl
        self.dtype = jnp.bfloat16 if bf16 else None

    def setup(self, kind, size, batch, trainable=None, lr=None):
        import jax.numpy as jnp
        import numpy as np
        from vggjax.inference import heads
        from vggjax.train import feature_cache, freezing, steps
        from vggjax.model import vgg
        base = vgg.create("vgg16", include_top=False, conv_impl=self.impl,
                            dtype=self.dtype or jnp.float32)
        key = self.jax.random.PRNGKey(0)
        base_vars = vgg.init_random(base, seed=0)
        images, labels = synthetic_batch(size, batch)
        if kind == "infer":
            step, x = feature_cache.make_extract_step(base, "caffe"), jnp.asarray(images)
            return lambda: step(base_vars, x).block_until_ready()
        net, variables = heads.init_classifier(base_vars, base, heads.Head(), size, key)
        tx = freezing.make_optimizer(freezing.book_rmsprop(lr), variables["params"], trainable)
        step = steps.make_train_step(net, tx, preprocess_mode="caffe", compute_dtype=self.dtype)
        state = [steps.TrainState.create(variables, tx)]
        data = {"image": jnp.asarray(images), "label": jnp.asarray(labels),
                "mask": jnp.ones((batch,), bool)}

        def run():
            state[0], metrics = step(state[0], data)
            return np.asarray(metrics["loss"])
        return run


class KerasWorker:
    """keras.applications.VGG16(include_top=False, weights=None) + the book's head, Keras defaults.
    backend "tensorflow": on a CPU-only machine Keras compiles no XLA, TF's oneDNN kernels run;
    "jax" (what a Keras reader moving to JAX tries first): Keras jit-compiles its steps with XLA."""

    def __init__(self, bf16: bool = False, backend: str = "tensorflow"):
        os.environ["KERAS_BACKEND"] = backend  # read once, when keras is first imported
        self.tf = None
        if backend == "tensorflow":
            import tensorflow as tf
            tf.config.set_visible_devices([], "GPU")
            tf.config.threading.set_intra_op_parallelism_threads(THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(THREADS)
            self.tf = tf
        import keras
        assert keras.backend.backend() == backend, keras.backend.backend()
        if bf16:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        self.keras = keras

    def setup(self, kind, size, batch, trainable=None, lr=None):
        tf, keras = self.tf, self.keras
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        images, labels = synthetic_batch(size, batch)
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
        inputs = keras.Input((size, size, 3))
        x = keras.applications.vgg16.preprocess_input(inputs)  # caffe: RGB->BGR, minus mean
        if kind == "infer" and tf is None:
            net = keras.Model(inputs, base(x))
            net.compile(jit_compile=True)
            x_in = images.astype("float32")
            return lambda: net.predict_on_batch(x_in)
        if kind == "infer":
            net = keras.Model(inputs, base(x))
            fn = tf.function(lambda t: net(tf.cast(t, tf.float32), training=False))
            x_in = tf.constant(images)
            return lambda: fn(x_in).numpy()
        for layer in base.layers:
            layer.trainable = trainable == "block5+head" and layer.name.startswith("block5")
        x = keras.layers.Flatten()(base(x))
        x = keras.layers.Dense(256, activation="relu")(x)
        x = keras.layers.Dropout(0.5)(x)
        # The loss in float32, as the mixed-precision guide asks.
        x = keras.layers.Dense(1)(x)
        net = keras.Model(inputs, keras.layers.Activation("sigmoid", dtype="float32")(x))
        net.compile(optimizer=keras.optimizers.RMSprop(lr), loss="binary_crossentropy")
        x_in, y_in = images.astype("float32"), labels.astype("float32")
        if tf is not None:
            x_in, y_in = tf.constant(x_in), tf.constant(y_in)
        return lambda: net.train_on_batch(x_in, y_in)


class TorchWorker:
    """torchvision's VGG16 `features` layout written out (torchvision is not installed),
    channels_last, inference_mode for inference; the book's head; RMSprop as Keras'."""

    def __init__(self, bf16: bool = False):
        import torch
        torch.set_num_threads(THREADS)
        self.torch, self.bf16 = torch, bf16

    def autocast(self):
        return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16)

    def setup(self, kind, size, batch, trainable=None, lr=None):
        torch = self.torch
        nn = torch.nn
        torch.manual_seed(0)
        from vggjax.testing.reference import CFGS, make_layers  # torchvision's layout, one copy

        features = make_layers(CFGS["D"], batch_norm=False)
        from vggjax.weights.preprocessing import CAFFE_MEAN_BGR  # one source for the caffe mean

        mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
        images, labels = synthetic_batch(size, batch)
        x_in = torch.from_numpy(images)

        def preprocess(x):  # uint8 NHWC RGB -> float NCHW (channels_last) BGR minus mean
            x = x.permute(0, 3, 1, 2).flip(1).float() - mean
            return x.contiguous(memory_format=torch.channels_last)

        if kind == "infer":
            features = features.eval().to(memory_format=torch.channels_last)

            def run():
                with torch.inference_mode(), self.autocast():
                    return features(preprocess(x_in))
            return run
        side = size // 32
        net = nn.Sequential(features, nn.Flatten(), nn.Linear(512 * side * side, 256), nn.ReLU(),
                            nn.Dropout(0.5), nn.Linear(256, 1)).to(memory_format=torch.channels_last)
        for i, p in features.named_parameters():
            p.requires_grad = trainable == "block5+head" and int(i.split(".")[0]) >= 24  # block5
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7)
        loss_fn = nn.BCEWithLogitsLoss()
        y_in = torch.from_numpy(labels).float()[:, None]
        net.train()

        def run():
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                logits = net(preprocess(x_in))
            loss = loss_fn(logits.float(), y_in)
            loss.backward()
            opt.step()
            return loss.item()
        return run


@functools.cache
def framework(name: str):
    """The worker object of framework `name` (one per process: Keras reads its backend once)."""
    base, bf16 = name.removesuffix("-bf16"), name.endswith("-bf16")
    if base.startswith("vggjax"):
        return JaxWorker(base.partition("-")[2] or "auto", bf16)
    if base == "keras-jax":
        return KerasWorker(bf16, backend="jax")
    return {"keras": KerasWorker, "torch": TorchWorker}[base](bf16)


def setup(name: str, **task):
    """The worker process's callable for `task` (a STEP_TASKS entry) in framework `name`."""
    return framework(name).setup(**task)


# --------------------------------------------------------------------------- step tasks
def bench_steps(tasks, frameworks, rounds: int, env: dict, log, target_s: float = 4.0) -> dict:
    """{task: {framework: {"img_s", "rounds", "first_s", ...}}}, round-robin per task."""
    workers = [harness.Worker("benchmarks.bench", name, env) for name in frameworks]
    results = {}
    try:
        for task in tasks:
            spec = STEP_TASKS[task]
            res, timers = results.setdefault(task, {}), {}
            for w in workers:
                info = w.setup(name=w.name, **spec)
                # One call's length sets the calls per round: about `target_s` of work each.
                calls = max(1, round(target_s / w.ask(run=1)["wall_s"]))
                res[w.name] = {"first_s": info["first_s"], "setup_s": info["setup_s"], "reps": calls}
                # One untimed call before each round: each round measures back-to-back batches,
                # as a training or extraction loop runs them. A process's first call after the
                # others' turn pays page faults again (vggjax/XLA: +1 s of kernel time at
                # 224x224, batch 32, on the AMX Xeon; TF's allocator keeps its memory).
                timers[w.name] = w.timer(calls, untimed=1)
            times = harness.interleave(timers, rounds, log=lambda _: None, warmup=False)
            for w in workers:
                w.free()
                entry, t = res[w.name], times[w.name]
                entry["rounds"] = [spec["batch"] / s for s in t]
                entry["img_s"] = statistics.median(entry["rounds"])
                entry["img_cpu_s"] = spec["batch"] / statistics.median(w.cpu)
                # The first call's cost beyond a steady-state call: tracing + compiling.
                entry["compile_s"] = max(0.0, entry["first_s"] - spec["batch"] / entry["img_s"])
            log(format_task(task, res))
    finally:
        for w in workers:
            w.close()
    return results


# --------------------------------------------------------------------------- pipeline & memory
def pipeline_main(n_per_class: int) -> None:
    """Child: decode + resize + augment epochs over `n_per_class` * 2 images; JSON out."""
    import jax
    from vggjax.train import augmentation, data
    root, how = harness.image_folder(n_per_class)
    try:
        split = data.load_split(root, "train", 150, 20, shuffle=True)
        aug = jax.jit(augmentation.augment, static_argnums=2)
        rate = _epochs(split, aug, augmentation.FIRST_EDITION)
    finally:
        shutil.rmtree(root)
    harness.reply({"img_s": rate, "images": split.num_examples, "data": how})


def _epochs(split, aug, config) -> float:
    """Best img/s of two epochs of decode + resize + augment, after a warm-up epoch."""
    import jax
    key = jax.random.PRNGKey(0)
    for batch in split.batches(0):  # warm-up epoch: compiles, fills the file cache
        aug(key, batch["image"], config).block_until_ready()
    rates = []
    for epoch in (1, 2):
        t0, n = time.perf_counter(), 0
        for i, batch in enumerate(split.batches(epoch)):
            aug(jax.random.fold_in(key, i), batch["image"], config).block_until_ready()
            n += int(batch["mask"].sum())
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def memory_main(n_per_class: int, size: int = 150) -> None:
    """Child: vggjax.train.feature_cache.extract over 2 * n_per_class images at size x size; peak RSS out."""
    from vggjax.train import data, feature_cache
    from vggjax.model import vgg
    root, how = harness.image_folder(n_per_class)
    base = vgg.create("vgg16", include_top=False, conv_impl="auto")
    variables = vgg.init_random(base)
    before = harness.peak_rss_mb()
    t0 = time.perf_counter()
    try:
        split = data.load_split(root, "train", size, 20, shuffle=False)
        with tempfile.TemporaryDirectory() as cache:
            out = feature_cache.extract(base, variables, {"train": split}, cache,
                                   preprocess_mode="caffe", progress=False)
            stored = out["train"].features.nbytes / 2**20
    finally:
        shutil.rmtree(root)
    harness.reply({"images": split.num_examples, "peak_rss_mb": harness.peak_rss_mb(),
                   "rss_before_mb": before, "features_mb": stored,
                   "img_s": split.num_examples / (time.perf_counter() - t0), "data": how})


# --------------------------------------------------------------------------- report
def format_task(task: str, res: dict) -> str:
    lines = []
    for name, e in res.items():
        suffix = "-bf16" if name.endswith("-bf16") else ""  # bf16 rows against bf16 peers
        refs = (res.get(peer + suffix, {}).get("img_s") for peer in PEERS)
        vs = " | ".join(f"{e['img_s'] / ref:5.2f}x" if ref else "   - " for ref in refs)
        spread = f"{min(e['rounds']):6.2f}-{max(e['rounds']):6.2f}"
        lines.append(f"| {task:9s} | {name:14s} | {e['img_s']:7.2f} | {spread} | {vs} "
                     f"| {e['img_cpu_s']:6.2f} | {e['compile_s']:6.1f} |")
    return "\n".join(lines)


def book_hours(rates: dict) -> float | None:
    """Projected hours of the book's three phases at {task: img/s} (None without all three
    rates). Validation and test passes run at the inference rate; the features phase's head
    training on cached features and the input pipeline (~80x faster) are left out."""
    if not all(rates.get(t) for t in ("infer150", "frozen", "finetune")):
        return None
    b, infer = BOOK, rates["infer150"]
    evals = b["validation"] / infer
    seconds = ((b["train"] + b["validation"] + b["test"]) / infer
               + b["frozen_epochs"] * (b["train"] / rates["frozen"] + evals)
               + b["finetune_epochs"] * (b["train"] / rates["finetune"] + evals)
               + 2 * b["test"] / infer)
    return seconds / 3600


PEERS = ("keras", "keras-jax", "torch")  # the ratio columns, each against the same-precision row
HEADER = ("| task      | framework      |   img/s | rounds min-max | vs Keras/TF | vs Keras/JAX | vs torch "
          "| img/cpu-s | first-call extra s |\n"
          "|-----------|----------------|---------|----------------|----------|----------|----------"
          "|-----------|--------------------|")


def bench_pipeline(n: int, steps: dict, env: dict, log) -> None:
    """The input pipeline over 2 * n photos in a fresh process, against the vggjax steps' rates."""
    pipe = log.data["pipeline"] = harness.child("benchmarks.bench", "--pipeline", str(n), env=env)
    train = steps.get("finetune", {}).get("vggjax", {}).get("img_s")
    frozen = steps.get("frozen", {}).get("vggjax", {}).get("img_s")
    log(f"\npipeline (decode + resize + FIRST_EDITION augment, {pipe['images']} {pipe['data']}): "
        f"{pipe['img_s']:.1f} img/s"
        + (f" = {pipe['img_s'] / train:.1f}x the vggjax fine-tune step" if train else "")
        + (f", {pipe['img_s'] / frozen:.1f}x the frozen-base step" if frozen else ""))


def bench_memory(sizes, image_size: int, env: dict, log) -> None:
    """Peak RSS of feature extraction to disk, a fresh process per number of photos a class."""
    mem = log.data["memory"] = [harness.child("benchmarks.bench", "--memory", str(n), "--image-size",
                                              str(image_size), env=env) for n in sizes]
    log(f"\nfeature extraction to disk (vggjax.train.feature_cache.extract, {image_size}x{image_size}, auto conv):")
    for m in mem:
        log(f"  {m['images']:5d} images: peak RSS {m['peak_rss_mb']:7.0f} MB "
            f"(features on disk {m['features_mb']:.0f} MB, {m['img_s']:.1f} img/s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="150x150 steps only, small pipeline and memory sets")
    p.add_argument("--tasks", default=None, help="comma list of " + ",".join(
        [*STEP_TASKS, "pipeline", "memory"]))
    p.add_argument("--frameworks", default=None, help=f"comma list of {','.join(FRAMEWORKS)} (default: all; "
                   "--smoke: vggjax,keras,torch)")
    p.add_argument("--no-hugepages", action="store_true", help="leave glibc malloc at its defaults")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", type=int, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=150, help=argparse.SUPPRESS)
    harness.arguments(p, results="results")
    a = p.parse_args(argv)
    if a.worker:
        return harness.serve(setup)
    if a.pipeline:
        return pipeline_main(a.pipeline)
    if a.memory:
        return memory_main(a.memory, a.image_size)
    quick_tasks = ["infer150", "finetune", "frozen", "pipeline", "memory"]
    smoke_tasks = ["infer150", "finetune", "pipeline", "memory"]
    tasks = a.tasks.split(",") if a.tasks else smoke_tasks if a.smoke else quick_tasks if a.quick else [
        *STEP_TASKS, "pipeline", "memory"]
    frameworks = (a.frameworks or ("vggjax,keras,torch" if a.smoke else ",".join(FRAMEWORKS))).split(",")
    for name, known in [*((t, [*STEP_TASKS, "pipeline", "memory"]) for t in tasks),
                        *((f, FRAMEWORKS) for f in frameworks)]:
        if name not in known:
            p.error(f"--{'tasks' if known != FRAMEWORKS else 'frameworks'}: {name!r} is not one of {','.join(known)}")
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.smoke:  # every step and the memory task at 32x32, batch 2, one call a round; 5 photos a class
        STEP_TASKS.update({t: dict(spec, size=32, batch=2) for t, spec in STEP_TASKS.items()})
        a.rounds = 1
    env = {} if a.no_hugepages else harness.HUGEPAGES
    log = harness.Log(f"vggjax benchmark: {THREADS} cores, median of {a.rounds} interleaved rounds")
    log.data.update(rounds=a.rounds, threads=THREADS, hugepages=not a.no_hugepages)
    log(HEADER)
    step_tasks = [t for t in tasks if t in STEP_TASKS]
    steps = log.data["steps"] = bench_steps(step_tasks, frameworks, a.rounds, env, log, 0.0 if a.smoke else 4.0)
    projection = {name: book_hours({t: r[name]["img_s"] for t, r in steps.items() if name in r})
                  for name in frameworks}
    projection = {k: v for k, v in projection.items() if v}
    if projection:
        log.data["book_hours"] = projection
        log(f"\nprojected wall time of the book's three phases ({BOOK['train']} training images, "
            f"{BOOK['frozen_epochs']}/{BOOK['finetune_epochs']} epochs, 150x150, batch 20, validation "
            f"and test passes at the inference rate): "
            + ", ".join(f"{name} {h:.1f} h" for name, h in projection.items()))
    if "pipeline" in tasks:
        bench_pipeline(5 if a.smoke else 100 if a.quick else 1000, steps, env, log)
    if "memory" in tasks:
        bench_memory((5,) if a.smoke else (20, 40, 80) if a.quick else (100, 200, 400), 32 if a.smoke else 150,
                     env, log)
    log.save(harness.out_path(a))


if __name__ == "__main__":
    main()
