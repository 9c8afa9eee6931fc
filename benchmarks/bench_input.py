"""Input pipelines, Grain vs tf.data, same run: images/s of decode + resize + batch over the book's
2000 training photos, and peak RSS of a process that lists and walks 2,000 vs 20,000 images.

    python -m benchmarks.bench_input [--data ../shared/data/cats_and_dogs_small] [--rounds 3]
                                     [--baseline REV] [--smoke] [--out F]

Each measurement runs in its own subprocess (a fresh process: no cache, no shared thread pool),
the pipelines alternating round by round; `--baseline REV` adds the Grain pipeline of vggjax as
of git revision REV (the code before a change: the whole `vggjax/` of REV, in its own process)
to the rotation, for a before/after ratio from the same run.
CPU ms/img is the process' CPU time (all threads) per image: steadier than img/s when other jobs
share the machine. The 20,000-image folder is hard links to the same 2000 photos (nothing
copied), built in a temp dir and removed afterwards. Results go to stdout and
benchmarks/results_input.md (+ .json), with the CPU it ran on and the load average.
"""
import argparse
import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import harness


def child_main(module: str, root: str, epoch: int) -> None:
    """Child: list `root`'s train split with vggjax.train.`module`, walk epoch `epoch` once."""
    pipeline = importlib.import_module(f"vggjax.train.{module}")
    t0 = time.perf_counter()
    split = pipeline.load_split(root, "train", 150, 32, shuffle=True, seed=0)
    t1, c1 = time.perf_counter(), time.process_time()
    n = sum(int(b["mask"].sum()) for b in split.batches(epoch))
    t2, c2 = time.perf_counter(), time.process_time()
    harness.reply({"listed_s": t1 - t0, "epoch_s": t2 - t1, "cpu_s": c2 - c1, "images": n})


def measure(module: str, root: str, epoch: int = 1, tree: Path | None = None) -> dict:
    return harness.child("benchmarks.bench_input", "--child", module, root, str(epoch), vggjax_tree=tree)


def linked_copies(src: Path, dst: Path, times: int) -> None:
    """dst in the book's layout with each train photo hard-linked `times` times."""
    for class_dir in sorted((src / "train").iterdir()):
        out = dst / "train" / class_dir.name
        out.mkdir(parents=True)
        for photo in sorted(class_dir.iterdir()):
            for k in range(times):
                os.link(Path(photo).resolve(), out / f"{k}_{photo.name}")


def speed_rounds(runs: dict, data: str, rounds: int, log) -> list[list[str]]:
    """Table rows, one per pipeline and round, the pipelines interleaved."""
    rows = []

    def candidate(name, module, tree):
        def run() -> float:
            m = measure(module, data, tree=tree)
            rows.append([name, len(rows) // len(runs) + 1, f"{m['listed_s']:.1f}", f"{m['epoch_s']:.2f}",
                         f"{m['images'] / m['epoch_s']:.0f}", f"{1e3 * m['cpu_s'] / m['images']:.2f}",
                         f"{m['maxrss_mb']:.0f}"])
            return m["epoch_s"] / m["images"]
        return run
    times = harness.interleave({name: candidate(name, *run) for name, run in runs.items()}, rounds, log,
                               warmup=False)
    log.data.update(seconds_per_image={k: list(v) for k, v in times.items()}, rounds=rows)
    med = {k: 1 / t.median for k, t in times.items()}
    ratios = [f"{k}/tfdata = {harness.speedup(times, k, 'tfdata'):.2f}" for k in med if k != "tfdata"]
    log.table(["pipeline", "round", "list+check s", "epoch s", "img/s", "CPU ms/img", "peak RSS MB"], rows)
    log("\nmedian img/s: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()) + "; " + ", ".join(ratios) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(harness.DATA))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", metavar="REV", help="also run vggjax/train/grain_data.py as of git "
                   "revision REV (e.g. the commit before a change), interleaved with the others")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    harness.arguments(p, results="results_input")
    args = p.parse_args()
    if args.child:
        return child_main(args.child[0], args.child[1], int(args.child[2]))
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="vggjax-bench-") as tmp:
        if args.smoke:  # 5 photos a class (or generated JPEGs), one round
            args.data, args.rounds = harness.image_folder(5)[0], 1
        elif not (Path(args.data) / "train").is_dir():
            p.error(f"--data: no train/ folder in {args.data}")
        runs = {"tfdata": ("data", None), "grain": ("grain_data", None)}
        if args.baseline:
            runs[f"grain@{args.baseline}"] = ("grain_data", harness.checkout(args.baseline, Path(tmp) / "baseline"))
        log = harness.Log("Input pipelines: Grain vs tf.data")
        speed_rounds(runs, args.data, args.rounds, log)
        big = Path(tmp) / "x10"
        linked_copies(Path(args.data), big, 10)
        rows = [[name, m["images"], f"{m['maxrss_mb']:.0f}"] for name, (module, tree) in runs.items()
                for m in (measure(module, root, epoch=0, tree=tree) for root in (args.data, str(big)))]
        log.data["listing_rss"] = rows
        log.table(["pipeline", "listed images", "peak RSS MB"], rows)
        if args.smoke:
            shutil.rmtree(args.data)
    log(f"\nload average (1 min) at end {os.getloadavg()[0]:.1f}")
    log.save(harness.out_path(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
