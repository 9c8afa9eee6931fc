"""LPIPS-VGG forward + backward, vggjax vs the `lpips` package on PyTorch, measured round-robin.

    python -m benchmarks.bench_losses [--rounds 3] [--batch 8] [--size 256] [--photos 8] [--smoke] [--out F]

Each contender runs in its own process (thread pools never overlap: only one computes at a
time) and every round visits all of them in turn, so a slow spell of this shared machine hits
them alike. One step = the gradient of sum(LPIPS(x0, x1)) with respect to x0, batch 8 at
256x256, on the same seeded random VGG16 trunk (torchvision layout, converted by vggjax) and
lpips' own v0.1 lin weights. fp32, and bf16 (vggjax: dtype=bfloat16 trunk; torch: CPU autocast).
Reported: median img/s over the rounds and ratios to lpips at the same precision.

`--photos N` also compares both on N real photo pairs from ../shared/data (cats_and_dogs_small,
consecutive test images, centre crops): max abs difference to lpips, and bf16 vs fp32 relative.
lpips is imported with a stand-in `torchvision.models` (vggjax.testing.reference.import_lpips).
Writes benchmarks/results_losses.md.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks import harness

DATA = harness.DATA / "test"
CONTENDERS = ("vggjax-fp32", "lpips-fp32", "vggjax-bf16", "lpips-bf16")


def batch(n: int, size: int, seed: int = 0):
    """x0, x1: float32 NHWC in [-1, 1], smooth images and a noisy copy (the same everywhere)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, size // 16 + 1, size // 16 + 1, 3))
    x0 = np.repeat(np.repeat(coarse, 16, 1), 16, 2)[:, :size, :size].astype(np.float32)
    x1 = np.clip(x0 + rng.normal(0, 0.1, x0.shape), -1, 1).astype(np.float32)
    return x0, x1


def make_step(name: str, trunk_dir: str, n: int, size: int):
    """A no-argument callable running one forward + backward step of contender `name`."""
    trunk_dir = Path(trunk_dir)
    x0, x1 = batch(n, size)
    framework, precision = name.split("-")
    if framework == "vggjax":
        import jax
        import jax.numpy as jnp
        from vggjax.losses import perceptual

        lp = perceptual.LPIPS.load(trunk_dir, dtype=jnp.bfloat16 if precision == "bf16" else jnp.float32)
        grad = jax.jit(jax.grad(lambda lp, a, b: jnp.sum(lp(a, b)), argnums=1))
        a, b = jnp.asarray(x0), jnp.asarray(x1)
        return lambda: grad(lp, a, b)
    import torch
    from vggjax.testing.reference import reference_lpips, write_lpips_trunk

    torch.set_num_threads(os.cpu_count() or 1)
    net = reference_lpips(write_lpips_trunk(trunk_dir.parent, seed=0)[0])
    a, b = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x0, x1))

    def step():
        x = a.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            d = net(x, b).sum()
        d.backward()
        return x.grad
    return step


def bench(trunk_dir: Path, rounds: int, n: int, size: int, log) -> dict:
    """{contender: harness.Series of seconds per step}, each contender in its own process."""
    workers = {name: harness.Worker("benchmarks.bench_losses", name) for name in CONTENDERS}
    try:
        firsts = {name: w.setup(name=name, trunk_dir=str(trunk_dir), n=n, size=size)["first_s"]
                  for name, w in workers.items()}
        log("  first calls: " + ", ".join(f"{name} {s:.1f} s" for name, s in firsts.items()))
        times = harness.interleave({name: w.timer() for name, w in workers.items()}, rounds, log,
                                   warmup=False)
        for name, s in firsts.items():
            times[name].first = s
    finally:
        for w in workers.values():
            w.close()
    return times


def photo_check(trunk_dir: Path, data: Path, n_pairs: int, size: int = 256) -> str:
    """LPIPS on real photo pairs: vggjax vs lpips (fp32), and vggjax bf16 vs fp32."""
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from vggjax.testing.reference import reference_lpips, run_lpips, write_lpips_trunk
    from vggjax.losses import perceptual

    files = sorted((data / "cats").glob("*.jpg"))[:n_pairs + 1]
    if len(files) < n_pairs + 1:
        raise SystemExit(f"--photos {n_pairs} needs {n_pairs + 1} images in {data / 'cats'}, found {len(files)}")

    def crop(path):
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
        return np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size)), np.float32) / 255

    x0 = np.stack([crop(f) for f in files[:-1]])
    x1 = np.stack([crop(f) for f in files[1:]])
    ref = run_lpips(reference_lpips(write_lpips_trunk(trunk_dir.parent, seed=0)[0]), x0, x1, normalize=True)
    d32 = np.asarray(perceptual.LPIPS.load(trunk_dir)(x0, x1, normalize=True))
    d16 = np.asarray(perceptual.LPIPS.load(trunk_dir, dtype=jnp.bfloat16)(x0, x1, normalize=True))
    return (f"real photos ({n_pairs} pairs of consecutive {data}/cats images, {size}x{size} "
            f"centre crops, [0,1] inputs, random trunk, v0.1 lin): LPIPS {ref.min():.4f}..{ref.max():.4f}; "
            f"vggjax fp32 vs lpips max abs diff {np.abs(d32 - ref).max():.2e}; vggjax bf16 vs fp32 "
            f"max relative diff {(np.abs(d16 - d32) / d32).max():.2e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--photos", type=int, default=8, help="real photo pairs to check (0: none)")
    p.add_argument("--data", type=Path, default=DATA, help=f"folder with cats/*.jpg (default {DATA})")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    harness.arguments(p, results="results_losses")
    a = p.parse_args(argv)
    if a.worker:
        return harness.serve(make_step)
    if a.smoke:
        a.rounds, a.batch, a.size, a.photos = 1, 1, 32, 1 if (a.data / "cats").is_dir() else 0
    for flag in ("rounds", "batch"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if a.size < 32 or a.photos < 0:
        p.error("--size must be >= 32 and --photos >= 0")
    log = harness.Log(f"LPIPS-VGG forward+backward, batch {a.batch} at {a.size}x{a.size}, median of "
                      f"{a.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        from vggjax.testing.reference import write_lpips_trunk

        _, trunk_dir = write_lpips_trunk(Path(tmp), seed=0)
        times = bench(trunk_dir, a.rounds, a.batch, a.size, log)
        log.data["seconds"] = {name: list(t) for name, t in times.items()}
        log()
        log.table(["contender", "img/s", "rounds min-max", "vs lpips (same precision)", "first call s"],
                  [[name, f"{a.batch / t.median:.2f}", t.spread(lambda s: a.batch / s),
                    f"{harness.speedup(times, name, 'lpips-' + name.split('-')[1]):.2f}x", f"{t.first:.1f}"]
                   for name, t in times.items()])
        if a.photos:
            log("\n" + photo_check(trunk_dir, a.data, a.photos))
    log.save(harness.out_path(a))


if __name__ == "__main__":
    main()
