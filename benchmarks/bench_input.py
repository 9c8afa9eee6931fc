"""Input pipelines, Grain vs tf.data, same run: images/s of decode + resize + batch over the book's
2000 training photos, and peak RSS of a process that lists and walks 2,000 vs 20,000 images.

    python benchmarks/bench_input.py [--data ../shared/data/cats_and_dogs_small] [--rounds 3]

Each measurement runs in its own subprocess (a fresh process: no cache, no shared thread pool),
the pipelines alternating round by round. The 20,000-image folder is hard links to the same
2000 photos (nothing copied), built in a temp dir and removed afterwards. Results go to stdout
and benchmarks/results_input.md, with the CPU it ran on.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from vggjax.train import {module} as pipeline
t0 = time.perf_counter()
split = pipeline.load_split({root!r}, "train", 150, 32, shuffle=True, seed=0)
t1 = time.perf_counter()
n = sum(int(b["mask"].sum()) for b in split.batches({epoch}))
t2 = time.perf_counter()
print(json.dumps({{"listed_s": t1 - t0, "epoch_s": t2 - t1, "images": n,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(module: str, root: str, epoch: int = 1) -> dict:
    code = CHILD.format(repo=str(REPO), module=module, root=root, epoch=epoch)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linked_copies(src: Path, dst: Path, times: int) -> None:
    """dst in the book's layout with each train photo hard-linked `times` times."""
    for class_dir in sorted((src / "train").iterdir()):
        out = dst / "train" / class_dir.name
        out.mkdir(parents=True)
        for photo in sorted(class_dir.iterdir()):
            for k in range(times):
                os.link(photo, out / f"{k}_{photo.name}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/cats_and_dogs_small"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cpu = subprocess.run("grep -o -w -E 'amx_bf16|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | xargs",
                         shell=True, capture_output=True, text=True).stdout.strip()
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    lines = [f"CPU: {model}, {os.cpu_count()} cores, flags {cpu}", "",
             "| pipeline | round | list+check s | epoch s | img/s | peak RSS MB |", "|---|---|---|---|---|---|"]
    speed = {"tfdata": [], "grain": []}
    for r in range(args.rounds):
        for module in (("data", "grain_data") if r % 2 == 0 else ("grain_data", "data")):
            m = measure(module, args.data)
            name = "tfdata" if module == "data" else "grain"
            speed[name].append(m["images"] / m["epoch_s"])
            lines.append(f"| {name} | {r + 1} | {m['listed_s']:.1f} | {m['epoch_s']:.1f} | "
                         f"{m['images'] / m['epoch_s']:.0f} | {m['rss_mb']:.0f} |")
            print(lines[-1], flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in speed.items()}
    lines += ["", f"median img/s: grain {med['grain']:.0f}, tf.data {med['tfdata']:.0f}: "
              f"grain/tf.data = {med['grain'] / med['tfdata']:.2f}", "",
              "| pipeline | listed images | peak RSS MB |", "|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="vggjax-bench-") as tmp:
        big = Path(tmp) / "x10"
        linked_copies(Path(args.data), big, 10)
        for name, module in (("tfdata", "data"), ("grain", "grain_data")):
            for root, n in ((args.data, 2000), (str(big), 20000)):
                m = measure(module, root, epoch=0)
                lines.append(f"| {name} | {m['images']} | {m['rss_mb']:.0f} |")
                print(lines[-1], flush=True)
    (REPO / "benchmarks" / "results_input.md").write_text("# Input pipelines: Grain vs tf.data\n\n"
                                                          "`python benchmarks/bench_input.py`\n\n"
                                                          + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
