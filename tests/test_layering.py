"""The layering the README's layout promises: the network and its weights stand alone (nothing
from the training workflow, the losses, the visualisations, export or the NNX face), and
`import vggjax` loads neither TensorFlow nor torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = Path(REPO) / "vggjax"
# Each foundation package and the vggjax packages it may import from (lazily or not).
ALLOWED = {
    "utils": {"utils"},
    "model": {"model", "utils"},
    "weights": {"weights", "model", "utils"},
}


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


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_foundation_package_imports_only_what_is_below_it(package):
    files = sorted((PACKAGE / package).glob("*.py"))
    assert files, f"no modules in vggjax/{package}"
    # The root re-exports only model and weights, so importing it (for __version__) is allowed.
    wrong = {f"{path.relative_to(PACKAGE)} imports vggjax.{name}"
             for path in files for name in vggjax_imports(path) - ALLOWED[package] - {""}}
    assert not wrong, sorted(wrong)


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
