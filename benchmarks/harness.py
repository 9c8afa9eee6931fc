"""The benchmarks' one harness: the CPU line, timing a callable, interleaving candidates against
their peers in the same run, a fresh process where a measurement needs one, and the results
(a markdown table and JSON).

Every benchmark runs from the repository root as a module, so `benchmarks` and this checkout's
`vggjax` import without path tricks:

    python -m benchmarks.bench_layers --smoke

`--smoke` (every script) runs the smallest settings in under a minute and writes its results
under SMOKE_DIR, never over the recorded benchmarks/results*.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
# The book's photos, where present: $VGGJAX_BENCH_DATA, else ../shared/data beside the checkout.
DATA = Path(os.environ.get("VGGJAX_BENCH_DATA") or ROOT.parent / "shared" / "data" / "cats_and_dogs_small")
SMOKE_DIR = Path(tempfile.gettempdir()) / "vggjax-bench-smoke"
# glibc hands every large allocation back to the kernel, so XLA's per-call temporaries and
# torch's activations are page-faulted in afresh on every call (~170-330 MB per VGG16 batch
# on 2 cores); transparent huge pages for malloc cut those faults 64-fold (benchmarks/README.md,
# finding 2). glibc reads it at start-up: it reaches only processes started with it.
HUGEPAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "XLA_FLAGS", "ATEN_CPU_CAPABILITY")  # an emulated CPU kind


# --------------------------------------------------------------------------- the CPU line
def cpu_line() -> str:
    """One line: CPU model, cores, the fast-path flags, oneDNN's effective ISA, jax's version and
    backend, any ISA caps in the environment, and the load average now."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.partition(":")[2].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    import jax

    from vggjax.model import cpu
    flags = " ".join(sorted(cpu.cpu_flags() & set(cpu.FAST_PATH_FLAGS))) or "none of them"
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    return (f"CPU: {model}, {os.cpu_count()} cores, flags {flags}; oneDNN ISA "
            f"{cpu.effective_isa() or 'n/a'}; jax {jax.__version__} ({jax.default_backend()})"
            + (f"; emulated kind: {', '.join(caps)}" if caps else "")
            + f"; load average {os.getloadavg()[0]:.1f}")


# --------------------------------------------------------------------------- timing
def block(out):
    """Wait for `out` (any pytree) to be computed where JAX computes it asynchronously."""
    jax = sys.modules.get("jax")
    return jax.block_until_ready(out) if jax is not None else out


def seconds(fn: Callable, calls: int = 1) -> float:
    """Seconds per call of `fn()` over `calls` back-to-back calls, its results blocked on."""
    start = time.perf_counter()
    for _ in range(calls):
        block(fn())
    return (time.perf_counter() - start) / calls


def per_call(fn: Callable, target_s: float, min_calls: int = 3) -> float:
    """Seconds per call of `fn` after one warm-up call, over enough calls to fill `target_s`
    (at least `min_calls`)."""
    once = seconds(fn)
    return seconds(fn, max(min_calls, round(target_s / max(once, 1e-9))))


class Series(list):
    """Seconds per round of one candidate, with its first (warm-up) call's seconds."""

    first: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self)

    def spread(self, per: Callable[[float], float] = float, fmt: str = ".2f") -> str:
        """'low-high' of the rounds, each seen through `per` (e.g. `lambda s: batch / s` for img/s)."""
        lo, hi = sorted((per(min(self)), per(max(self))))
        return f"{lo:{fmt}}-{hi:{fmt}}"


def interleave(candidates: Mapping[str, Callable[[], float]], rounds: int, log=print,
               warmup: bool = True) -> dict[str, Series]:
    """Each candidate returns the seconds it measured (see `Timer`, `Worker.timer`). One
    untimed warm-up call each (its seconds kept as `first`), then `rounds` rounds A B C, B C A,
    ...: every round visits every candidate, starting one further on, so a slow spell of a
    shared machine hits all of them alike. {name: Series of seconds}."""
    names = list(candidates)
    out = {name: Series() for name in names}
    if warmup:
        for name in names:
            out[name].first = getattr(candidates[name], "once", candidates[name])()
            log(f"  first call {name}: {out[name].first:.2f} s")
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(candidates[name]())
        log(f"  round {r + 1}: " + ", ".join(f"{n} {s[-1]:.3g} s" for n, s in out.items()))
    return out


class Timer:
    """A candidate for `interleave`: seconds per call of `fn` over `calls` calls, the fastest of
    `best_of` such measurements; its warm-up (`once`) is a single call."""

    def __init__(self, fn: Callable, calls: int = 1, best_of: int = 1):
        self.fn, self.calls, self.best_of = fn, calls, best_of

    def __call__(self) -> float:
        return min(seconds(self.fn, self.calls) for _ in range(self.best_of))

    def once(self) -> float:
        return seconds(self.fn)


def speedup(series: Mapping[str, Series], ours: str, peer: str) -> float:
    """peer / ours of the median seconds: above 1 where `ours` is faster than `peer`."""
    return series[peer].median / series[ours].median


# --------------------------------------------------------------------------- processes
def with_hugepages() -> None:
    """Restart this benchmark (`python -m benchmarks.<script> ...`) with HUGEPAGES set, once:
    glibc reads it only at start-up, and every framework in the process then gets it alike."""
    key, value = next(iter(HUGEPAGES.items()))
    if os.environ.get(key) != value:
        os.execve(sys.executable, [sys.executable, "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]],
                  _env(HUGEPAGES, [ROOT]))


def _env(extra: Mapping[str, str] | None, pythonpath: Sequence[Path]) -> dict:
    path = [str(p) for p in pythonpath] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(extra or {}), PYTHONPATH=os.pathsep.join(path))


def child(module: str, *args: str, env: Mapping[str, str] | None = None,
          vggjax_tree: Path | None = None) -> dict:
    """Run `python -m module *args` in a fresh process (no caches, no other thread pool) and
    return the JSON object of its last stdout line (`reply`). `vggjax_tree`: a folder holding
    another `vggjax/` (`checkout`), imported instead of this checkout's."""
    cwd = vggjax_tree or ROOT  # `-m` puts the working directory first on sys.path
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, env=_env(env, [ROOT]), check=False)
    if proc.returncode:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reply(result: Mapping) -> None:
    """A `child`'s answer: its result as one JSON line, with the process's peak RSS in MB."""
    print(json.dumps({**result, "maxrss_mb": peak_rss_mb()}), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def checkout(rev: str, into: Path) -> Path:
    """`vggjax/` as of git revision `rev`, extracted under `into` (for `child`'s vggjax_tree):
    a before/after comparison in one run, each side in its own process."""
    archive = subprocess.run(["git", "archive", rev, "vggjax"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"git revision {rev!r}: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


class Worker:
    """A candidate in a process of its own, kept for the whole run, so that candidates' thread
    pools never overlap (one computes at a time). The process is `python -m module --worker`,
    whose main calls `serve`; `setup(**spec)` there builds the callable that `run` times."""

    def __init__(self, module: str, name: str, env: Mapping[str, str] | None = None):
        self.name = name
        quiet = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--worker", name], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=_env(env, [ROOT]), stderr=quiet)
        self.cpu: list[float] = []  # CPU seconds per call of each `timer` measurement

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (rerun with BENCH_VERBOSE=1 to see why)")
        return json.loads(line)

    def setup(self, **spec) -> dict:
        """Build the callable in the worker and call it once: {"setup_s", "first_s", ...}."""
        self.cpu = []
        return self.ask(setup=spec)

    def timer(self, calls: int = 1, untimed: int = 0) -> Callable[[], float]:
        """A candidate for `interleave`: seconds per call over `calls` calls, after `untimed`
        calls (a process's first call after the others' turn pays page faults again)."""
        def measure() -> float:
            if untimed:
                self.ask(run=untimed)
            r = self.ask(run=calls)
            self.cpu.append(r["cpu_s"] / calls)
            return r["wall_s"] / calls
        return measure

    def free(self) -> None:
        """Drop the worker's callable, so the next `setup` does not hold two at once."""
        self.ask(free=1)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve(setup: Callable[..., Callable]) -> None:
    """A `Worker`'s process: answer JSON-line requests on stdin. {"setup": spec} builds
    run = setup(**spec) and calls it once; {"run": n} calls it n times: wall and CPU seconds;
    {"free": 1} drops it."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the frameworks' chatter goes to stderr, the protocol alone to our stdout
    run = None
    for line in sys.stdin:
        request = json.loads(line)
        t0, c0 = time.perf_counter(), time.process_time()
        if "setup" in request:
            run = setup(**request["setup"])
            t1 = time.perf_counter()
            block(run())  # trace / compile / first touch: timed apart from the steady state
            answer = {"setup_s": t1 - t0, "first_s": time.perf_counter() - t1}
        elif "run" in request:
            for _ in range(request["run"]):
                block(run())
            answer = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        else:  # {"free": 1}: drop the callable (its model, state, buffers) before the next setup
            run, answer = None, {}
        out.write(json.dumps({**answer, "maxrss_mb": peak_rss_mb()}) + "\n")
        out.flush()


# --------------------------------------------------------------------------- data
def image_folder(n_per_class: int, size: int = 200) -> tuple[str, str]:
    """(root, how): the shared cats_and_dogs_small photos (first n per class, linked into a
    temporary book-layout folder) or, without them, generated JPEGs."""
    import numpy as np
    from PIL import Image
    root = tempfile.mkdtemp(prefix="vggjax-bench-")
    rng = np.random.default_rng(0)
    data = DATA
    for cls in ("cats", "dogs"):
        d = Path(root, "train", cls)
        d.mkdir(parents=True)
        src = sorted((data / "train" / cls).glob("*.jpg"))[:n_per_class] if data.is_dir() else []
        for i in range(n_per_class):
            if i < len(src):
                os.symlink(src[i], d / src[i].name)
            else:
                pixels = rng.integers(0, 256, (size, int(size * 0.75), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{cls}.{i}.jpg", quality=90)
    return root, ("cats_and_dogs_small" if data.is_dir() else "generated JPEGs")


# --------------------------------------------------------------------------- results
def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A markdown table: header cells, then rows of cells (already formatted)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


class Log(list):
    """The run's report: `log(text)` prints `text` at once and keeps it; `data` collects what
    goes to the JSON file; `save` writes both."""

    def __init__(self, title: str):
        super().__init__()
        self.data: dict = {"command": command(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        self(f"# {title}\n\n`{self.data['command']}`, {self.data['time']}\n")
        self.data["cpu"] = cpu_line()
        self(self.data["cpu"] + "\n")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.append(text)

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        for line in table(header, rows):
            self(line)

    def save(self, out: Path | None, lines: Sequence[str] | None = None) -> None:
        """`out`.md (`lines`, default the whole log) and `out`.json (`data`); nothing if None."""
        if out is None:
            return
        md, js = Path(f"{out}.md"), Path(f"{out}.json")
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text("\n".join(self if lines is None else lines) + "\n")
        js.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"wrote {md} and {js}", flush=True)


def command() -> str:
    """How this run was started, as one would type it from the repository root."""
    module = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "?"
    return " ".join(["python -m benchmarks." + module, *sys.argv[1:]])


def arguments(p: argparse.ArgumentParser, results: str | None) -> None:
    """The options every benchmark has: --smoke and --out (`results`: the recorded file's
    base name under benchmarks/, e.g. "results_export"; None: print only unless --out)."""
    p.add_argument("--smoke", action="store_true",
                   help=f"smallest settings, under a minute: checks the script runs (results under {SMOKE_DIR})")
    p.add_argument("--out", type=Path, default=None,
                   help="results file without suffix: writes OUT.md and OUT.json (default "
                   + (f"benchmarks/{results}" if results else "none: printed only") + ")")
    p.set_defaults(results_name=results)


def out_path(a: argparse.Namespace) -> Path | None:
    """Where the results go: --out, else a smoke run's SMOKE_DIR, else the recorded file."""
    if a.out is not None:
        return a.out
    if a.smoke:
        return SMOKE_DIR / (a.results_name or Path(sys.argv[0]).stem)
    return ROOT / "benchmarks" / a.results_name if a.results_name else None
