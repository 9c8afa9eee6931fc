"""vggjax vs Keras/TF vs PyTorch on the same VGG16 work, measured round-robin in one run.

    python benchmarks/bench.py [--rounds 3] [--quick] [--tasks infer150,finetune,...]

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
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlog import Log

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cats_and_dogs_small"
THREADS = os.cpu_count() or 1
# glibc hands every large allocation back to the kernel, so XLA's per-call temporaries and
# torch's activations are page-faulted in afresh on every call (~170-330 MB per VGG16
# batch here); transparent huge pages cut those faults 64-fold. Applied to every framework.
MALLOC_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
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
    loop.make_train_step; `impl` is the VGG conv_impl."""

    def __init__(self, impl: str, bf16: bool = False):
        import jax
        import jax.numpy as jnp
        self.jax, self.impl = jax, impl
        self.dtype = jnp.bfloat16 if bf16 else None

    def setup(self, kind, size, batch, trainable=None, lr=None):
        import jax.numpy as jnp
        import numpy as np
        from vggjax.inference import classifier
        from vggjax.train import feature_cache, freezing, loop
        from vggjax.model import vgg
        base = vgg.create("vgg16", include_top=False, conv_impl=self.impl,
                            dtype=self.dtype or jnp.float32)
        key = self.jax.random.PRNGKey(0)
        base_vars = vgg.init_random(base, seed=0)
        images, labels = synthetic_batch(size, batch)
        if kind == "infer":
            step, x = feature_cache.make_extract_step(base, "caffe"), jnp.asarray(images)
            return lambda: step(base_vars, x).block_until_ready()
        net, variables = classifier.init_classifier(base_vars, base, classifier.Head(), size, key)
        tx = freezing.make_optimizer(freezing.book_rmsprop(lr), variables["params"], trainable)
        step = loop.make_train_step(net, tx, preprocess_mode="caffe", compute_dtype=self.dtype)
        state = [loop.TrainState.create(variables, tx)]
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


def worker_main(name: str) -> None:
    """Serve JSON-line requests on stdin: {"setup": task} then {"run": reps} ... {"free": 1}."""
    sys.path.insert(0, str(ROOT))
    base, bf16 = name.removesuffix("-bf16"), name.endswith("-bf16")
    if base.startswith("vggjax"):
        worker = JaxWorker(base.partition("-")[2] or "auto", bf16)
    elif base == "keras-jax":
        worker = KerasWorker(bf16, backend="jax")
    else:
        worker = {"keras": KerasWorker, "torch": TorchWorker}[base](bf16)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # framework chatter goes to stderr, the protocol alone to our stdout
    run = None
    for line in sys.stdin:
        req = json.loads(line)
        t0, c0 = time.perf_counter(), time.process_time()
        if "setup" in req:
            run = worker.setup(**req["setup"])
            t1 = time.perf_counter()
            run()  # trace / compile / first-touch; timed apart from the steady state
            reply = {"setup_s": t1 - t0, "first_s": time.perf_counter() - t1}
        elif "run" in req:
            for _ in range(req["run"]):
                run()
            reply = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        else:
            run = None
            reply = {}
        reply["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.write(json.dumps(reply) + "\n")
        out.flush()


class Worker:
    def __init__(self, name: str, env: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, stderr=subprocess.DEVNULL if not os.environ.get(
                                         "BENCH_VERBOSE") else None)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died (rerun with BENCH_VERBOSE=1 to see why)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- step tasks
def bench_steps(tasks, frameworks, rounds: int, env: dict, log) -> dict:
    """{task: {framework: {"img_s", "rounds", "first_s", ...}}}, round-robin per task."""
    workers = [Worker(name, env) for name in frameworks]
    results = {}
    try:
        for task in tasks:
            spec = STEP_TASKS[task]
            res = results[task] = {}
            for w in workers:
                info = w.ask(setup=spec)
                # One call's length sets the reps per round: about 4 s of work each.
                t = w.ask(run=1)["wall_s"]
                res[w.name] = {"first_s": info["first_s"], "setup_s": info["setup_s"],
                               "reps": max(1, round(4.0 / t)), "rounds": [], "cpu": []}
            for r in range(rounds):
                for w in workers[r % len(workers):] + workers[:r % len(workers)]:
                    entry = res[w.name]
                    # One untimed call first: each round measures back-to-back batches, as a
                    # training or extraction loop runs them. A process's first call after the
                    # others' turn pays page faults again (vggjax/XLA: +1 s of kernel time at
                    # 224x224, batch 32, on the AMX Xeon; TF's allocator keeps its memory).
                    w.ask(run=1)
                    reply = w.ask(run=entry["reps"])
                    entry["rounds"].append(entry["reps"] * spec["batch"] / reply["wall_s"])
                    entry["cpu"].append(entry["reps"] * spec["batch"] / reply["cpu_s"])
                    entry["maxrss_mb"] = reply["maxrss_mb"]
            for w in workers:
                w.ask(free=1)
                entry = res[w.name]
                entry["img_s"] = statistics.median(entry["rounds"])
                entry["img_cpu_s"] = statistics.median(entry["cpu"])
                # The first call's cost beyond a steady-state call: tracing + compiling.
                entry["compile_s"] = max(0.0, entry["first_s"] - spec["batch"] / entry["img_s"])
            log(format_task(task, res))
    finally:
        for w in workers:
            w.close()
    return results


# --------------------------------------------------------------------------- pipeline & memory
def image_folder(n_per_class: int, size: int = 200) -> tuple[str, str]:
    """(root, how): the shared cats_and_dogs_small photos (first n per class, linked into a
    temporary book-layout folder) or, without them, generated JPEGs."""
    import numpy as np
    from PIL import Image
    root = tempfile.mkdtemp(prefix="vggjax-bench-")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        d = Path(root, "train", cls)
        d.mkdir(parents=True)
        src = sorted((DATA / "train" / cls).glob("*.jpg"))[:n_per_class] if DATA.is_dir() else []
        for i in range(n_per_class):
            if i < len(src):
                os.symlink(src[i], d / src[i].name)
            else:
                pixels = rng.integers(0, 256, (size, int(size * 0.75), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{cls}.{i}.jpg", quality=90)
    return root, ("cats_and_dogs_small" if DATA.is_dir() else "generated JPEGs")


def pipeline_main(n_per_class: int) -> None:
    """Child: decode + resize + augment epochs over `n_per_class` * 2 images; JSON out."""
    sys.path.insert(0, str(ROOT))
    import jax
    from vggjax.train import augmentation, data
    root, how = image_folder(n_per_class)
    try:
        split = data.load_split(root, "train", 150, 20, shuffle=True)
        aug = jax.jit(augmentation.augment, static_argnums=2)
        rate = _epochs(split, aug, augmentation.FIRST_EDITION)
    finally:
        shutil.rmtree(root)
    print(json.dumps({"img_s": rate, "images": split.num_examples, "data": how}))


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


def memory_main(n_per_class: int) -> None:
    """Child: vggjax.train.feature_cache.extract over 2 * n_per_class images at 150x150; peak RSS out."""
    sys.path.insert(0, str(ROOT))
    from vggjax.train import data, feature_cache
    from vggjax.model import vgg
    root, how = image_folder(n_per_class)
    base = vgg.create("vgg16", include_top=False, conv_impl="auto")
    variables = vgg.init_random(base)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        split = data.load_split(root, "train", 150, 20, shuffle=False)
        with tempfile.TemporaryDirectory() as cache:
            out = feature_cache.extract(base, variables, {"train": split}, cache,
                                   preprocess_mode="caffe", progress=False)
            stored = out["train"].features.nbytes / 2**20
    finally:
        shutil.rmtree(root)
    print(json.dumps({"images": split.num_examples, "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": before, "features_mb": stored,
        "img_s": split.num_examples / (time.perf_counter() - t0), "data": how}))


def child(mode: str, n: int, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, f"--{mode}", str(n)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def cpu_line() -> str:
    """The CPU model, the flags that decide the fast paths (AMX, AVX512-BF16, AVX-512, AVX2) and
    the ISA caps of an emulated CPU kind (oneDNN's effective ISA, XLA_FLAGS, ATEN_CPU_CAPABILITY)."""
    from vggjax.model.onednn import cpu_flags, effective_isa
    flags = cpu_flags()
    model = next((l.partition(":")[2].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    found = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in (
        ("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX-512", "avx512f"), ("AVX2", "avx2")))
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "XLA_FLAGS", "ATEN_CPU_CAPABILITY")
            if os.environ.get(k)]
    return (f"CPU: {model}; {found}; oneDNN ISA {effective_isa() or 'n/a'}"
            + (f" (emulated kind: {', '.join(caps)})" if caps else ""))


PEERS = ("keras", "keras-jax", "torch")  # the ratio columns, each against the same-precision row
HEADER = ("| task      | framework      |   img/s | rounds min-max | vs Keras/TF | vs Keras/JAX | vs torch "
          "| img/cpu-s | first-call extra s |\n"
          "|-----------|----------------|---------|----------------|----------|----------|----------"
          "|-----------|--------------------|")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="150x150 steps only, small pipeline and memory sets")
    p.add_argument("--tasks", default=None, help="comma list of " + ",".join(
        [*STEP_TASKS, "pipeline", "memory"]))
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--no-hugepages", action="store_true", help="leave glibc malloc at its defaults")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(a.worker)
    if a.pipeline:
        return pipeline_main(a.pipeline)
    if a.memory:
        return memory_main(a.memory)

    quick_tasks = ["infer150", "finetune", "frozen", "pipeline", "memory"]
    tasks = a.tasks.split(",") if a.tasks else quick_tasks if a.quick else [*STEP_TASKS, "pipeline", "memory"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3",
               **({} if a.no_hugepages else MALLOC_ENV))
    frameworks = a.frameworks.split(",")
    log = Log()

    meta = {"rounds": a.rounds, "threads": THREADS, "hugepages": not a.no_hugepages,
            "load_avg_start": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    log(f"# vggjax benchmark {meta['time']}: {THREADS} cores, median of {a.rounds} interleaved "
        f"rounds, load average at start {meta['load_avg_start'][0]:.1f}\n")
    meta["cpu"] = cpu_line()
    log(meta["cpu"] + "\n")
    log(HEADER)
    step_tasks = [t for t in tasks if t in STEP_TASKS]
    results = {"meta": meta, "steps": bench_steps(step_tasks, frameworks, a.rounds, env, log)}
    projection = {name: book_hours({t: r[name]["img_s"] for t, r in results["steps"].items() if name in r})
                  for name in frameworks}
    projection = {k: v for k, v in projection.items() if v}
    if projection:
        results["book_hours"] = projection
        log(f"\nprojected wall time of the book's three phases ({BOOK['train']} training images, "
            f"{BOOK['frozen_epochs']}/{BOOK['finetune_epochs']} epochs, 150x150, batch 20, validation "
            f"and test passes at the inference rate): "
            + ", ".join(f"{name} {h:.1f} h" for name, h in projection.items()))
    if "pipeline" in tasks:
        n = 100 if a.quick else 1000
        pipe = results["pipeline"] = child("pipeline", n, env)
        train = results["steps"].get("finetune", {}).get("vggjax", {}).get("img_s")
        frozen = results["steps"].get("frozen", {}).get("vggjax", {}).get("img_s")
        log(f"\npipeline (decode + resize + FIRST_EDITION augment, {pipe['images']} {pipe['data']}): "
            f"{pipe['img_s']:.1f} img/s"
            + (f" = {pipe['img_s'] / train:.1f}x the vggjax fine-tune step" if train else "")
            + (f", {pipe['img_s'] / frozen:.1f}x the frozen-base step" if frozen else ""))
    if "memory" in tasks:
        sizes = (20, 40, 80) if a.quick else (100, 200, 400)
        mem = results["memory"] = [child("memory", n, env) for n in sizes]
        log("\nfeature extraction to disk (vggjax.train.feature_cache.extract, 150x150, auto conv):")
        for m in mem:
            log(f"  {m['images']:5d} images: peak RSS {m['peak_rss_mb']:7.0f} MB "
                f"(features on disk {m['features_mb']:.0f} MB, {m['img_s']:.1f} img/s)")
    Path(a.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    Path(a.out + ".md").write_text("\n".join(log) + "\n")
    print(f"\nwrote {a.out}.json and {a.out}.md")


if __name__ == "__main__":
    main()
