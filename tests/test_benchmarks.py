"""benchmarks/: the one harness (interleaving, timing, tables, a revision's vggjax), the rules the
scripts keep (no sys.path edits, no other script's internals, no private vggjax names, no
patching of vggjax), and no timings in the library's own text."""
import ast
import io
import re
import time
import tokenize
from pathlib import Path

from helpers import REPO

from benchmarks import harness

BENCHMARKS = sorted((Path(REPO) / "benchmarks").glob("*.py"))
SCRIPTS = {"benchmarks", *(p.stem for p in BENCHMARKS)}  # what a script could import of its siblings
LIBRARY = sorted((Path(REPO) / "vggjax").rglob("*.py"))
# A timing in prose: "12 ms", "0.7 s on", "~3x faster", "1.3-1.6x TensorFlow's", "img/s".
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ms|µs)\b|\b\d+(\.\d+)? s\s+(on|per)\b|~\d+(\.\d+)? s\b"
                    r"|\d(\.\d+)?(x|%) (faster|slower|the\b|as much)"
                    r"|\d+(\.\d+)?-\d+(\.\d+)?x\b|img/s|GF/s|GFLOP", re.IGNORECASE)


def test_interleave_rotates_the_start_and_warms_up_once():
    calls = []

    def candidate(name):
        return lambda: calls.append(name) or 1.0
    out = harness.interleave({n: candidate(n) for n in "abc"}, 3, log=lambda _: None)
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab"
    assert [len(s) for s in out.values()] == [3, 3, 3] and out["a"].first == 1.0


def test_timer_speedup_and_table():
    t = harness.Timer(lambda: time.sleep(0.01), calls=2, best_of=2)
    assert 0.01 <= t() < 0.5 and 0.01 <= t.once() < 0.5
    series = {"ours": harness.Series([1.0, 2.0, 3.0]), "peer": harness.Series([4.0, 6.0, 8.0])}
    assert harness.speedup(series, "ours", "peer") == 3.0  # peer / ours: above 1, ours is faster
    assert series["ours"].spread(lambda s: 10 / s) == "3.33-10.00"
    assert harness.table(["a", "b"], [[1, "x"]]) == ["| a | b |", "|---|---|", "| 1 | x |"]


SERVED = """
import importlib.util, sys
from benchmarks import harness
if sys.argv[1:2] == ["--worker"]:
    harness.serve(lambda n: lambda: sum(range(n)))
else:
    harness.reply({"vggjax": importlib.util.find_spec("vggjax").origin, "args": sys.argv[1:]})
"""


def test_worker_and_child_run_in_their_own_processes(tmp_path, monkeypatch):
    (tmp_path / "served_bench.py").write_text(SERVED)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    worker = harness.Worker("served_bench", "sum")
    try:
        assert set(worker.setup(n=1000)) == {"setup_s", "first_s", "maxrss_mb"}
        seconds = harness.interleave({"sum": worker.timer(calls=3, untimed=1)}, 2, log=lambda _: None,
                                     warmup=False)["sum"]
        assert len(seconds) == 2 and len(worker.cpu) == 2 and all(s >= 0 for s in seconds)
        worker.free()
        assert worker.setup(n=10)["first_s"] >= 0
    finally:
        worker.close()
    assert worker.proc.returncode == 0
    tree = harness.checkout("HEAD", tmp_path / "old")
    out = harness.child("served_bench", "a", "b", vggjax_tree=tree)
    assert out["args"] == ["a", "b"] and out["vggjax"] == str(tree / "vggjax" / "__init__.py")
    assert harness.child("served_bench")["vggjax"] == str(Path(REPO) / "vggjax" / "__init__.py")


def _vggjax_modules(tree: ast.Module) -> set[str]:
    """Local names bound to vggjax modules or names (import vggjax..., from vggjax... import x)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("vggjax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vggjax"):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_benchmarks_use_the_harness_and_only_public_vggjax():
    problems = []
    for path in BENCHMARKS:
        tree = ast.parse(path.read_text(), filename=str(path))
        vggjax = _vggjax_modules(tree)
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                problems.append(f"{where}: sys.path")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vggjax"):
                problems += [f"{where}: private {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in SCRIPTS:
                problems += [f"{where}: imports {node.module}.{a.name}" for a in node.names
                             if node.module != "benchmarks.harness" and (node.module, a.name) != ("benchmarks", "harness")]
            if isinstance(node, ast.Import):
                problems += [f"{where}: imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in SCRIPTS and a.name != "benchmarks.harness"]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and getattr(node.value, "id", None) in vggjax):
                problems.append(f"{where}: private {node.value.id}.{node.attr}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                problems += [f"{where}: patches {t.value.id}.{t.attr}" for t in targets
                             if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) in vggjax]
    assert not problems, problems


def test_library_text_quotes_no_timings():
    """Timings belong in benchmarks/results*.md (results_library.md keeps the old ones)."""
    found = []
    for path in LIBRARY:
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        for tok in tokens:
            prose = tok.type == tokenize.COMMENT or (tok.type == tokenize.STRING and tok.string.startswith(('"""', "'''")))
            if prose and TIMING.search(tok.string):
                found.append(f"{path.relative_to(REPO)}:{tok.start[0]}: {TIMING.search(tok.string).group()}")
    assert not found, found
