"""The layering the README's layout promises, for every package: each imports only the packages
below it (imports inside functions count), no two modules import each other even through others,
and `import vggjax` loads neither TensorFlow nor torch."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = Path(REPO) / "vggjax"
# Each package and the vggjax packages it may import from (lazily or not): the README's graph,
#   utils <- model <- weights <- inference <- {losses, viz, train, export} ; train <- nnx ;
#   {viz, export, train} <- cli
BELOW = {
    "utils": set(),
    "model": {"utils"},
    "weights": {"model", "utils"},
    "inference": {"weights", "model", "utils"},
    "losses": {"weights", "model", "utils"},
    "viz": {"inference", "weights", "model", "utils"},
    "train": {"inference", "weights", "model", "utils"},
    "export": {"inference", "weights", "model", "utils"},
    "nnx": {"train", "inference", "weights", "model", "utils"},
    "testing": {"weights", "model", "utils"},
    "cli": {"viz", "export", "train", "inference", "weights", "model", "utils"},
}
ALLOWED = {package: below | {package} for package, below in BELOW.items()}


def vggjax_imports(path: Path) -> set[str]:
    """The vggjax subpackages `path` imports anywhere in its code (inside functions too), e.g.
    {"model", "utils"}; names the package root only re-exports (`from vggjax import __version__`)
    count as the root, ""."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "vggjax":
            names = [f"vggjax.{alias.name}" for alias in node.names]  # `from vggjax import viz`
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        parts = [name.split(".") for name in names if name.split(".")[0] == "vggjax"]
        found |= {p[1] if len(p) > 1 and (PACKAGE / p[1]).is_dir() else "" for p in parts}
    return found


def test_every_package_has_its_place():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_is_below_it(package):
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files, f"no modules in vggjax/{package}"
    # The root re-exports only model and weights, so importing it (for __version__) is allowed.
    wrong = {f"{path.relative_to(PACKAGE)} imports vggjax.{name}"
             for path in files for name in vggjax_imports(path) - ALLOWED[package] - {""}}
    assert not wrong, sorted(wrong)


def module_imports(path: Path) -> set[str]:
    """The vggjax modules `path` imports anywhere in its code, as dotted names of files that exist
    (`from vggjax.train import loop` -> "vggjax.train.loop"; a package -> its __init__)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            file = Path(REPO, *name.split("."))
            if name.split(".")[0] == "vggjax" and (file.with_suffix(".py").is_file() or file.is_dir()):
                found.add(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (node -> successors) as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        # A package's own __init__ importing its modules is how packages re-export, not a cycle.
        graph[name] = {m for m in module_imports(path) if not m.startswith(name + ".")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import vggjax.losses\n"
                   "def f():\n    from vggjax.train import checkpoint\n    from vggjax import viz, __version__\n")
    assert vggjax_imports(bad) == {"losses", "train", "viz", ""}


def test_import_vggjax_loads_neither_tensorflow_nor_torch(subprocess_env):
    script = ("import sys, vggjax\n"
              "print(sorted(m for m in ('tensorflow', 'torch', 'keras', 'vggjax.train', 'vggjax.viz',"
              " 'vggjax.losses', 'vggjax.export', 'vggjax.nnx') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old, new, name", [
    ("vggjax.train.classifier", "vggjax.inference.classifier", "load_classifier"),
    ("vggjax.viz.predict_files", "vggjax.inference.predictor", "load_predictor"),
    ("vggjax.export.serving", "vggjax.inference.serving", "from_source"),
    ("vggjax.export.artifact", "vggjax.inference.artifact", "load"),
    ("vggjax.model.onednn", "vggjax.model.cpu", "describe_cpu"),
    ("vggjax.train.loop", "vggjax.train.steps", "make_train_step"),
    ("vggjax.inference.classifier", "vggjax.inference.heads", "Head"),
    ("vggjax.model.vgg", "vggjax.model.pooling", "adaptive_pool_matrix"),
    ("vggjax.train.splits", "vggjax.train.image_folder", "list_folder")])
def test_a_moved_name_still_works_for_a_release_with_a_warning(old, new, name):
    import importlib

    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        moved = getattr(importlib.import_module(old), name)
    assert moved is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        getattr(importlib.import_module(old), "no_such_name")


def test_classifier_export_is_save_for_a_release_with_a_warning():
    from vggjax.inference import classifier
    with pytest.warns(DeprecationWarning, match=r"classifier.export is now classifier.save"):
        with pytest.raises(TypeError):
            classifier.export()  # the warning comes first, then save's own argument check


def test_the_public_api_is_reachable_from_its_package():
    import vggjax.inference
    import vggjax.losses
    import vggjax.train
    import vggjax.viz
    from vggjax.inference import classifier
    from vggjax.losses import perceptual
    from vggjax.train import loop, steps
    from vggjax.viz import convnet

    assert vggjax.losses.LPIPS is perceptual.LPIPS and vggjax.losses.style_loss is perceptual.style_loss
    assert vggjax.viz.grad_cam is convnet.grad_cam and vggjax.viz.overlay is convnet.overlay
    assert vggjax.inference.load_classifier is classifier.load_classifier
    assert vggjax.train.fit is loop.fit and vggjax.train.TrainState is steps.TrainState


def test_the_readme_code_layout_names_every_module_and_only_those():
    readme = (Path(REPO) / "README.md").read_text()
    layout = readme[readme.index("## Code layout"):]
    for package in ALLOWED:
        row = next(line for line in layout.splitlines() if line.startswith(f"| `{package}/` |"))
        named = {name for name in re.findall(r"`(\w+\.py)`", row) if name != "__main__.py"}
        modules = {p.name for p in (PACKAGE / package).glob("*.py") if p.name != "__init__.py"}
        assert named == modules, (package, sorted(named - modules), sorted(modules - named))
