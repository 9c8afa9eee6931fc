"""timm weights from the Hugging Face Hub: huggingface_hub itself reads them, at the pinned
commit, from a Hub cache the tests write in the Hub's layout, with HF_HUB_OFFLINE=1: no network."""
import os
from pathlib import Path

import numpy as np
import pytest

import vggjax
from helpers import run_script
from vggjax.utils import digests
from vggjax.utils.trees import flatten
from vggjax.weights import hub
from vggjax.weights.download import DownloadError

REV = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(root: Path, arch: str, file: Path, revision: str = REV) -> Path:
    """The Hub cache's layout for one file: models--timm--<arch>.tv_in1k/blobs/<sha256>, the
    snapshot of `revision` linking to it, refs/main naming the commit. Returns the blob."""
    repo = root / f"models--timm--{arch}.tv_in1k"
    blob = repo / "blobs" / digests.file_digest(file)
    snapshot = repo / "snapshots" / revision
    for folder in (blob.parent, snapshot, repo / "refs"):
        folder.mkdir(parents=True, exist_ok=True)
    os.link(file, blob)  # the tests' own 528 MB file: no copy
    (snapshot / hub.FILENAME).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(revision)
    return blob


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """The Hub client, in this process, reading only the cache under tmp_path/hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_fetch_reads_the_pinned_commit_from_the_hub_cache(offline_cache, tmp_path, monkeypatch):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"timm weights stand-in")
    blob = write_hub_cache(offline_cache, "vgg16", file)
    path = hub.fetch("vgg16", REV)
    assert path == offline_cache / "models--timm--vgg16.tv_in1k" / "snapshots" / REV / "model.safetensors"
    assert os.path.realpath(path) == str(blob)
    monkeypatch.setitem(hub.REVISIONS, "vgg16", REV)  # the pin, as it will be filled in
    assert hub.fetch("vgg16") == path


def test_a_commit_not_in_the_cache_offline_fails_in_one_line(offline_cache, tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"timm weights stand-in")
    write_hub_cache(offline_cache, "vgg16", file)
    with pytest.raises(DownloadError, match=r"timm/vgg16.tv_in1k at f{40} \(HF_HUB_OFFLINE is set") as err:
        hub.fetch("vgg16", "f" * 40)
    assert "\n" not in str(err.value)


def test_a_changed_cache_file_is_refused(offline_cache, tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"timm weights stand-in")
    blob = write_hub_cache(offline_cache, "vgg16", file)
    file.write_bytes(b"something else")  # the hard link: the blob changes too
    with pytest.raises(DownloadError, match=r"does not have the sha256 the Hub gave it"):
        hub.fetch("vgg16", REV)
    assert blob.exists()


def test_without_a_pinned_commit_it_says_where_to_find_one():
    with pytest.raises(ValueError, match=r"no Hub commit is pinned for timm vgg16.*--revision SHA "
                                         r"\(from https://huggingface.co/timm/vgg16.tv_in1k/commits/main\)"):
        hub.revision_for("vgg16")
    with pytest.raises(ValueError, match=r"--revision 'main' is not a commit sha"):
        hub.revision_for("vgg16", "main")


@pytest.mark.slow  # converts a 528 MB file in a subprocess
def test_cli_converts_timm_weights_from_the_hub_cache_offline(torch_vgg16_files, tmp_path, subprocess_env):
    """`--source timm` without --input, as a user runs it offline: HF_HUB_OFFLINE=1 and the
    Hub's cache (HF_HUB_CACHE); the result equals converting the same file given with --input."""
    write_hub_cache(tmp_path / "hub", "vgg16", torch_vgg16_files / "model.safetensors")
    env = dict(subprocess_env, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    done = run_script("tools/convert_weights.py", "--source", "timm", "--arch", "vgg16", "--revision", REV,
                      "--output", tmp_path / "out", env=env)
    assert done.returncode == 0, done.stderr
    got = vggjax.load(tmp_path / "out")
    assert got.meta["source_file"].endswith(f"snapshots/{REV}/model.safetensors")
    want = vggjax.load(torch_vgg16_files / "converted")  # the same weights in torchvision's .pth
    for path, value in flatten(got.params).items():
        np.testing.assert_array_equal(value, flatten(want.params)[path], err_msg=path)
