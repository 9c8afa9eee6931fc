"""Input pipelines, Grain vs tf.data, same run: images/s of decode + resize + batch over the book's
2000 training photos, and peak RSS of a process that lists and walks 2,000 vs 20,000 images.

    python benchmarks/bench_input.py [--data ../shared/data/cats_and_dogs_small] [--rounds 3] [--baseline REV]

Each measurement runs in its own subprocess (a fresh process: no cache, no shared thread pool),
the pipelines alternating round by round; `--baseline REV` adds grain_data.py as of git revision
REV (the code before a change) to the rotation, for a before/after ratio from the same run.
CPU ms/img is the process' CPU time (all threads) per image: steadier than img/s when other jobs
share the machine. The 20,000-image folder is hard links to the same 2000 photos (nothing
copied), built in a temp dir and removed afterwards. Results go to stdout and
benchmarks/results_input.md, with the CPU it ran on and the load average.
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
import importlib.util, json, resource, sys, time
sys.path.insert(0, {repo!r})
if {baseline!r}:  # an older grain_data.py stands in for the module (Split.batches imports it by name)
    spec = importlib.util.spec_from_file_location("vggjax.train.grain_data", {baseline!r})
    sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[spec.name])
from vggjax.train import {module} as pipeline
t0 = time.perf_counter()
split = pipeline.load_split({root!r}, "train", 150, 32, shuffle=True, seed=0)
t1, c1 = time.perf_counter(), time.process_time()
n = sum(int(b["mask"].sum()) for b in split.batches({epoch}))
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({{"listed_s": t1 - t0, "epoch_s": t2 - t1, "cpu_s": c2 - c1, "images": n,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(module: str, root: str, epoch: int = 1, baseline: str = "") -> dict:
    code = CHILD.format(repo=str(REPO), module=module, root=root, epoch=epoch, baseline=baseline)
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
    p.add_argument("--baseline", metavar="REV", help="also run vggjax/train/grain_data.py as of git "
                   "revision REV (e.g. the commit before a change), interleaved with the others")
    args = p.parse_args()
    cpu = subprocess.run("grep -o -w -E 'amx_bf16|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | xargs",
                         shell=True, capture_output=True, text=True).stdout.strip()
    model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    with tempfile.TemporaryDirectory(prefix="vggjax-bench-") as tmp:
        runs = [("tfdata", "data", ""), ("grain", "grain_data", "")]
        if args.baseline:
            old = Path(tmp) / "grain_data_baseline.py"
            old.write_bytes(subprocess.run(["git", "show", f"{args.baseline}:vggjax/train/grain_data.py"],
                                           cwd=REPO, capture_output=True, check=True).stdout)
            runs.append((f"grain@{args.baseline}", "grain_data", str(old)))
        load = os.getloadavg()
        lines = [f"CPU: {model}, {os.cpu_count()} cores, flags {cpu}", "",
                 "| pipeline | round | list+check s | epoch s | img/s | CPU ms/img | peak RSS MB |",
                 "|---|---|---|---|---|---|---|"]
        speed = {name: [] for name, _, _ in runs}
        for r in range(args.rounds):
            for name, module, baseline in runs[r % len(runs):] + runs[:r % len(runs)]:
                m = measure(module, args.data, baseline=baseline)
                speed[name].append(m["images"] / m["epoch_s"])
                lines.append(f"| {name} | {r + 1} | {m['listed_s']:.1f} | {m['epoch_s']:.2f} | "
                             f"{m['images'] / m['epoch_s']:.0f} | {1e3 * m['cpu_s'] / m['images']:.2f} | "
                             f"{m['rss_mb']:.0f} |")
                print(lines[-1], flush=True)
        med = {k: sorted(v)[len(v) // 2] for k, v in speed.items()}
        ratios = [f"{k}/tfdata = {v / med['tfdata']:.2f}" for k, v in med.items() if k != "tfdata"]
        lines += ["", "median img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()) + "; "
                  + ", ".join(ratios), "", "| pipeline | listed images | peak RSS MB |", "|---|---|---|"]
        big = Path(tmp) / "x10"
        linked_copies(Path(args.data), big, 10)
        for name, module, baseline in runs:
            for root in (args.data, str(big)):
                m = measure(module, root, epoch=0, baseline=baseline)
                lines.append(f"| {name} | {m['images']} | {m['rss_mb']:.0f} |")
                print(lines[-1], flush=True)
        end = os.getloadavg()
    lines += ["", f"load average (1 min) at start {load[0]:.1f}, at end {end[0]:.1f}"]
    command = " ".join(["python benchmarks/bench_input.py", *sys.argv[1:]])
    (REPO / "benchmarks" / "results_input.md").write_text(
        f"# Input pipelines: Grain vs tf.data\n\n`{command}`\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
