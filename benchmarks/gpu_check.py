"""One-GPU check of vggjax: bf16 vs fp32 parity and img/s at 224 against PyTorch (AMP, channels_last).

Run through benchmarks/gpu_check.sh (or `python -m benchmarks.gpu_check`). Needs only jax, flax
and optax (synthetic arrays, no TensorFlow); the PyTorch rows appear when torch with CUDA is
importable. `--cpu-smoke` (or `--smoke`) runs the same code at 32x32, batch 2, on the CPU, to
show the script works end to end.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from vggjax.inference import heads
from vggjax.model import vgg
from vggjax.train import freezing, steps
from vggjax.weights.preprocessing import CAFFE_MEAN_BGR, preprocess_input


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth uint8 photos-alike (B, S, S, 3): low-frequency noise, so activations look natural."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, size // 8 + 1, size // 8 + 1, 3))
    return np.clip(np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :size, :size], 0, 255).astype(np.uint8)


def jax_rows(size, infer_batch, train_batch, min_seconds):
    rows, notes = [], []
    x = images(infer_batch, size)
    base = vgg.create("vgg16", include_top=False)
    variables = vgg.init_random(base)

    def features(dtype, impl="direct", precision=None):
        m = base.clone(dtype=dtype, conv_impl=impl)
        fn = jax.jit(lambda v, im: m.apply(v, preprocess_input(im, "caffe").astype(dtype)).astype(jnp.float32))
        with jax.default_matmul_precision(precision):
            return fn, np.asarray(fn(variables, x))

    _, ref = features(jnp.float32, precision="highest")
    scale = np.abs(ref).max()
    for name, dtype, impl in (("fp32", jnp.float32, "direct"), ("bf16", jnp.bfloat16, "direct"),
                              ("fp32 winograd", jnp.float32, "winograd")):
        fn, out = features(dtype, impl)
        err = np.abs(out - ref).max()
        notes.append(f"parity {name:13s} vs fp32 'highest': max abs {err:.3g} "
                     f"(features up to {scale:.3g}, relative {err / scale:.2e})")
        xd = jnp.asarray(x)
        sec = harness.per_call(lambda: fn(variables, xd).block_until_ready(), min_seconds)
        rows.append((f"vggjax {name}", "inference", infer_batch / sec))

    xt = images(train_batch, size, seed=1)
    batch = {"image": jnp.asarray(xt), "label": jnp.asarray(np.arange(train_batch) % 2, jnp.int32),
             "mask": jnp.ones((train_batch,), bool)}
    for name, dtype in (("fp32", None), ("bf16", jnp.bfloat16)):
        net, v = heads.init_classifier(variables, base, heads.Head(), size, jax.random.PRNGKey(1))
        tx = freezing.make_optimizer(freezing.book_rmsprop(1e-5), v["params"], "block5+head")
        step = steps.make_train_step(net, tx, preprocess_mode="caffe", compute_dtype=dtype)
        state = [steps.TrainState.create(v, tx)]

        def run():
            state[0], metrics = step(state[0], batch)
            metrics["loss"].block_until_ready()
        rows.append((f"vggjax {name}", "fine-tune step", train_batch / harness.per_call(run, min_seconds)))
    return rows, notes


def torch_rows(size, infer_batch, train_batch, min_seconds, device):
    import torch
    nn = torch.nn
    from vggjax.testing.reference import CFGS, make_layers  # torchvision's layout, one copy

    feats = make_layers(CFGS["D"], batch_norm=False).to(device, memory_format=torch.channels_last)
    mean = torch.tensor(CAFFE_MEAN_BGR, device=device).view(1, 3, 1, 1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def prep(x):
        return (x.permute(0, 3, 1, 2).flip(1).float() - mean).contiguous(memory_format=torch.channels_last)

    rows = []
    x = torch.from_numpy(images(infer_batch, size)).to(device)
    for name, amp in (("fp32", False), ("AMP bf16", True)):
        def infer():
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=amp):
                feats(prep(x))
            sync()
        rows.append((f"torch {name}", "inference", infer_batch / harness.per_call(infer, min_seconds)))
    side = size // 32
    net = nn.Sequential(feats, nn.Flatten(), nn.Linear(512 * side * side, 256), nn.ReLU(),
                        nn.Dropout(0.5), nn.Linear(256, 1)).to(device, memory_format=torch.channels_last)
    for i, p in feats.named_parameters():
        p.requires_grad = int(i.split(".")[0]) >= 24  # block5 (torchvision indices 24, 26, 28)
    opt = torch.optim.RMSprop([p for p in net.parameters() if p.requires_grad], lr=1e-5, alpha=0.9, eps=1e-7)
    xt = torch.from_numpy(images(train_batch, size, seed=1)).to(device)
    y = (torch.arange(train_batch, device=device) % 2).float()[:, None]
    for name, amp in (("fp32", False), ("AMP bf16", True)):
        def train():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device, torch.bfloat16, enabled=amp):
                loss = nn.functional.binary_cross_entropy_with_logits(net(prep(xt)).float(), y)
            loss.backward()
            opt.step()
            sync()
        rows.append((f"torch {name}", "fine-tune step", train_batch / harness.per_call(train, min_seconds)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="32x32, batch 2, on the CPU: checks the script only")
    harness.arguments(p, results=None)
    a = p.parse_args(argv)
    a.smoke = a.cpu_smoke = a.smoke or a.cpu_smoke
    if a.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
        size, infer_batch, train_batch, min_seconds = 32, 2, 2, 0.0
    else:
        size, infer_batch, train_batch, min_seconds = 224, 64, 32, 3.0
    log = harness.Log(f"One-device check: jax on {jax.devices()[0].device_kind}; VGG16 at {size}x{size}, "
                      f"inference batch {infer_batch}, fine-tune batch {train_batch}")
    rows, notes = jax_rows(size, infer_batch, train_batch, min_seconds)
    try:
        import torch
    except ImportError:
        torch = None
        notes.append("torch not installed: no PyTorch rows")
    if torch is not None:
        device = "cuda" if torch.cuda.is_available() and not a.cpu_smoke else "cpu"
        if device == "cpu" and not a.cpu_smoke:
            notes.append("torch has no CUDA here: no PyTorch rows")
        else:
            torch.backends.cudnn.benchmark = True
            rows += torch_rows(size, infer_batch, train_batch, min_seconds, device)
            notes.append(f"torch {torch.__version__} on {device}")
    best_torch = {task: max((r[2] for r in rows if r[0].startswith("torch") and r[1] == task), default=None)
                  for task in ("inference", "fine-tune step")}
    log.data.update(rows=rows, notes=notes)
    log.table(["run", "task", "img/s", "vs best torch"],
              [[name, task, f"{rate:.1f}", f"{rate / best_torch[task]:.2f}x" if best_torch[task] else "-"]
               for name, task, rate in rows])
    log("\n" + "\n".join(notes))
    log.save(harness.out_path(a))


if __name__ == "__main__":
    main()
