"""README.md as a user follows it: every shell command that works offline runs (small settings
appended), then every Python block runs as written, in order, as one session in the same folder.

Python blocks are found and run by pytest-markdown-docs (its fence parser, its `notest` marker and
its runner, whose failures show the README's own lines); they share one namespace, top to bottom,
as the README says. Commands that need a download, several hosts or the test suite itself are
listed in NOT_RUN with the reason; a new README command must be added to one of the two lists.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from pytest_markdown_docs._runners import get_runner
from pytest_markdown_docs.plugin import extract_fence_tests

from helpers import REPO, script_env
from vggjax.train import synthetic
from vggjax.weights.keras import write_legacy_h5

README = Path(REPO) / "README.md"
TEXT = README.read_text()
PYTHON_BLOCKS = list(extract_fence_tests(MarkdownIt("commonmark"), TEXT, 0, README))
FINETUNE_SMALL = ["--epochs", "0", "--image-size", "48"]
# The first test that asks for the module fixture also waits for every command (~10 min on 2 busy cores).
ALL_COMMANDS = pytest.mark.timeout(1800)  # evaluate and export only, the demo's size

# Each offline command, as the README writes it -> the small settings the test appends.
RUN = {
    "make demo": ["--epochs", "0"],
    "vggjax convert --source keras --arch vgg16 --input "
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 --output weights/vgg16_notop": [],
    "python examples/finetune_catsdogs.py --smoke": ["--epochs", "0"],
    "python examples/finetune_catsdogs.py --data path/to/cats_and_dogs_small "
    "--weights weights/vgg16_notop": FINETUNE_SMALL,
    "vggjax predict cat.jpg --weights runs/finetune_catsdogs/classifiers/finetune": [],
    "python examples/style_transfer.py --smoke": ["--steps", "2", "--save-every", "1"],
    "vggjax export runs/finetune_catsdogs/classifiers/finetune --format jax --output catsdogs-jax": [],
    "vggjax export runs/finetune_catsdogs/classifiers/finetune --format savedmodel "
    "--output catsdogs-tf": [],
    "vggjax export runs/finetune_catsdogs/classifiers/finetune --format onnx --output catsdogs-onnx": [],
    "vggjax predict cat.jpg --weights catsdogs-onnx": [],
    "export GLIBC_TUNABLES=glibc.malloc.hugetlb=1": [],
    # Coming from Keras or PyTorch: on the fine_tuning.keras and photo.jpg its Python block writes
    "vggjax convert --source keras --input fine_tuning.keras --class-names cats,dogs "
    "--output imported/catsdogs": [],
    "vggjax predict photo.jpg --weights imported/catsdogs": [],
    "vggjax export imported/catsdogs --format jax --output imported-jax": [],
    "python examples/finetune_catsdogs.py --data path/to/cats_and_dogs_small --weights "
    "weights/vgg16_notop --precision bf16 --workdir runs/finetune_bf16": FINETUNE_SMALL,
}
DOWNLOAD = "downloads the official weights"
NOT_RUN = {
    "make test": "runs this test suite",
    "vggjax convert --source keras --arch vgg16": DOWNLOAD,
    "vggjax convert --source keras --arch vgg16 --include-top": DOWNLOAD,
    "vggjax convert --source torchvision --arch vgg16_bn --include-top": DOWNLOAD,
    "vggjax convert --source keras --arch vgg16 --output weights/vgg16_notop": DOWNLOAD,
    "vggjax convert --source keras --arch vgg19": DOWNLOAD,
    "vggjax convert --source timm --arch vgg16 --include-top --input model.safetensors":
        "reads timm's model.safetensors, a Hugging Face download",
    "python examples/finetune_catsdogs.py --data tfds": "downloads tfds cats_vs_dogs",
    "JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i python "
    "examples/finetune_catsdogs.py --data-parallel --phases frozen,finetune --data DIR --weights W":
        "several hosts (tests/test_multihost.py runs two processes)",
    "srun --ntasks-per-node=1 python examples/finetune_catsdogs.py --data-parallel --phases "
    "frozen,finetune ...": "a Slurm cluster",
    "python examples/style_transfer.py --content photo.jpg --style painting.jpg --weights "
    "~/.cache/vggjax/converted/keras_vgg19_notop --preset book1 --out runs/style": "the VGG19 download",
    "vggjax predict elephant.jpg --weights ~/.cache/vggjax/converted/keras_vgg16 --top 5 "
    "--cam cams/": "ImageNet weights with their top (a download)",
    "vggjax convert --source torchvision --arch vgg16 --input catsdogs_vgg16.pth --class-names "
    "cats,dogs --output imported/tv": "a model fine-tuned in PyTorch (tests/test_imported.py writes "
    "one with torch.save)",
    "vggjax convert --source timm --arch vgg16 --revision COMMIT_SHA": "the Hugging Face Hub",
    "HF_HUB_OFFLINE=1 vggjax convert --source timm --arch vgg16 --revision COMMIT_SHA --output "
    "w/timm16": "a Hub cache that the download above filled",
    "pytest -m slow": "the test suite", "pytest -m memcheck": "the test suite",
    "ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest": "the test suite",
}


def shell_commands(text: str) -> list[str]:
    """The commands of the README's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type == "fence" and token.info.split()[:1] == ["bash"]:
            for line in token.content.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*", "", line).strip()
                if line:
                    commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_is_run_or_says_why_not():
    commands = shell_commands(TEXT)
    assert sorted(set(commands)) == sorted(RUN.keys() | NOT_RUN.keys())


def make_command(line: str) -> list[str]:
    """`make demo` is its Makefile recipe (the venv's python is the one running these tests)."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (Path(REPO) / "Makefile").read_text(), re.M).group(1)
    return shlex.split(recipe.replace("$(PY)", "python"))


def run_command(line: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    """One README command in `folder`, with RUN's small settings appended."""
    if line.startswith("export "):
        name, value = line.split(" ", 1)[1].split("=", 1)
        env[name] = value
        return subprocess.CompletedProcess(line, 0, "", "")
    args = make_command(line) if line.startswith("make ") else shlex.split(line)
    if args[0] == "vggjax":  # the installed command, as `python -m vggjax` of this checkout
        args = [sys.executable, "-m", "vggjax", *args[1:], *RUN[line]]
    else:
        assert args[0] == "python", line
        args = [sys.executable, os.path.join(REPO, args[1]), *args[2:], *RUN[line]]
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def user_files(folder: Path) -> None:
    """What the README assumes a user has: the official Keras file (random weights in its layout),
    a small cats_and_dogs_small, a cat.jpg."""
    import jax
    from vggjax.model.vgg import create, init_random

    params = jax.device_get(init_random(create("vgg16", include_top=False), 0)["params"])
    write_legacy_h5(params, folder / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    data = folder / "path" / "to" / "cats_and_dogs_small"
    synthetic.make_image_folder(data, sizes={"train": 4, "validation": 2, "test": 2})
    for split in ("train", "validation", "test"):
        for ours, book in zip(synthetic.CLASSES, ("cats", "dogs")):
            (data / split / ours).rename(data / split / book)
    shutil.copy(data / "test" / "cats" / "discs.0.jpg", folder / "cat.jpg")
    keras_model = next(b for b in PYTHON_BLOCKS if 'model.save("fine_tuning.keras")' in b.source)
    cwd = os.getcwd()
    os.chdir(folder)  # the block writes fine_tuning.keras and photo.jpg, as a user's session does
    try:
        exec(keras_model.source, {"__name__": "readme"})
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every RUN command in README order in one folder: {command: CompletedProcess}."""
    folder = tmp_path_factory.mktemp("readme")
    user_files(folder)
    env = script_env(folder)
    results = {}
    for line in shell_commands(TEXT):
        if line in RUN and line not in results:
            results[line] = run_command(line, folder, env)
    return folder, results


def output(results: dict, line: str) -> str:
    result = results[line]
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@ALL_COMMANDS
@pytest.mark.parametrize("line", [c for c in RUN if not c.startswith("export ")])
def test_readme_command_runs(readme_run, line):
    folder, results = readme_run
    output(results, line)


@pytest.mark.slow
@ALL_COMMANDS
def test_readme_outputs_are_where_the_prose_says(readme_run):
    folder, results = readme_run
    run = folder / "runs" / "finetune_catsdogs"  # the default --workdir
    for name in ("history.json", "results.json", "run.json", "config.json",  # curves.png: once an epoch ran
                 "classifiers/finetune/base/vggjax.json"):
        assert (run / name).is_file(), name
    assert (folder / "runs" / "smoke_grain" / "classifiers" / "finetune").is_dir()  # make demo
    assert (folder / "runs" / "smoke_tfdata" / "classifiers" / "finetune").is_dir()  # --smoke
    converted = output(results, [c for c in RUN if "--output weights/vgg16_notop" in c][0])
    assert converted.strip() == f"converted keras vgg16 (without top) to {folder / 'weights' / 'vgg16_notop'}"
    exported = output(results, [c for c in RUN if "--format jax" in c][0])
    assert "uint8 (N, 48, 48, 3) -> probabilities, class_ids (fp32)" in exported
    for line in RUN:  # predict names the class, then P(dogs), as the README's comment says
        if line.startswith("vggjax predict"):
            assert re.search(r"^  (cats|dogs) \([01]\.\d{4}\); P\(dogs\) = [01]\.\d{4}$",
                             output(results, line), re.M), line


@pytest.fixture(scope="module")
def session(readme_run):
    """The README's Python session: one namespace, run in the commands' folder."""
    folder, _ = readme_run
    cwd = os.getcwd()
    os.chdir(folder)
    yield {"done": 0, "globals": {"__name__": "readme"}}
    os.chdir(cwd)


@pytest.mark.slow
@ALL_COMMANDS
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)),
                         ids=[f"line{b.start_line}" for b in PYTHON_BLOCKS])
def test_readme_python_block(session, index):
    runner = get_runner(None)
    while session["done"] <= index:  # a block alone (-k) runs the blocks above it first
        block = PYTHON_BLOCKS[session["done"]]
        try:
            runner.runtest(block, session["globals"])
        except Exception:
            pytest.fail(runner.repr_failure(block, pytest.ExceptionInfo.from_current()), pytrace=False)
        session["done"] += 1


def test_readme_python_blocks_are_counted():
    """Few blocks are skipped (notest), each saying why in its first line."""
    skipped = re.findall(r"```python notest\n# (Not run by the tests: .+)", TEXT)
    assert len(skipped) == TEXT.count("```python notest") == 2
    assert len(PYTHON_BLOCKS) == TEXT.count("```python\n") == 8
