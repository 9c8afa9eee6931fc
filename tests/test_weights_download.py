"""Official weight files: pinned URLs and checksums, verified download, offline failure, cache."""
import ast
import hashlib
import importlib.util
import time
from pathlib import Path

import pytest

from vggjax.weights import download
from vggjax.weights.download import DownloadError
from vggjax.utils import digests, ownership
from vggjax.utils.cache import cache_dir


def keras_application_source(arch):
    """Source text of keras/src/applications/<arch>.py, found without importing keras (and TF)."""
    [keras_dir] = importlib.util.find_spec("keras").submodule_search_locations
    return (Path(keras_dir) / "src" / "applications" / f"{arch}.py").read_text()


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_keras_table_is_what_keras_itself_downloads(arch):
    tree = ast.parse(keras_application_source(arch))
    consts = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id.startswith("WEIGHTS_PATH")}
    hashes = [ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
              for kw in node.keywords if kw.arg == "file_hash"]  # full file first, then notop
    assert download.official_file("keras", arch, True) == download.WeightFile(
        consts["WEIGHTS_PATH"], "md5", hashes[0])
    assert download.official_file("keras", arch, False) == download.WeightFile(
        consts["WEIGHTS_PATH_NO_TOP"], "md5", hashes[1])


def test_torchvision_checksum_is_the_sha256_prefix_in_the_file_name():
    wf = download.official_file("torchvision", "vgg16_bn", include_top=False)
    assert wf == download.WeightFile("https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
                                     "sha256", "6c64b313")
    assert wf.filename == "vgg16_bn-6c64b313.pth"


@pytest.mark.parametrize("source, arch, pattern", [
    ("keras", "vgg11", r"only for vgg16 and vgg19.*torchvision"),
    ("timm", "vgg16", r"no checksum pinned.*huggingface.co/timm/vgg16.tv_in1k.*--input FILE"),
    ("caffe", "vgg16", r"unknown weights source 'caffe'"),
])
def test_files_we_cannot_fetch_say_why(source, arch, pattern):
    with pytest.raises(ValueError, match=pattern):
        download.official_file(source, arch, include_top=True)


@pytest.fixture
def served(tmp_path):
    """A local file reachable by URL, standing in for the official server."""
    payload = b"not really weights, but bytes with a known checksum\n" * 1000
    src = tmp_path / "served" / "vgg16-0000.pth"
    src.parent.mkdir()
    src.write_bytes(payload)
    return src.as_uri(), payload


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
def test_download_keeps_a_file_whose_checksum_matches(served, tmp_path, algorithm):
    url, payload = served
    digest = hashlib.new(algorithm, payload).hexdigest()
    expected = digest[:8] if algorithm == "sha256" else digest  # torchvision pins a prefix
    dest = download.download(url, tmp_path / "cache" / "w.pth", algorithm, expected)
    assert dest.read_bytes() == payload
    assert digests.file_digest(dest, algorithm) == digest
    assert sorted(p.name for p in dest.parent.iterdir()) == [ownership.OWNED, "w.pth"]  # no .part left


def test_download_refuses_a_checksum_mismatch_and_deletes_it(served, tmp_path):
    url, _ = served
    with pytest.raises(DownloadError, match=r"expected sha256 397923af .*discarded"):
        download.download(url, tmp_path / "cache" / "w.pth", "sha256", "397923af")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_fails_fast_and_says_how_to_pass_the_file(tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"could not download .*--input FILE"):
        # Port 9 (discard) on the loopback: refused at once, no network needed.
        download.download("http://127.0.0.1:9/vgg16.h5", tmp_path / "w.h5", "md5", "0" * 32,
                          timeout=2)
    assert time.monotonic() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_fetch_uses_the_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VGGJAX_CACHE", str(tmp_path))
    wf = download.official_file("torchvision", "vgg11", include_top=True)
    cached = tmp_path / "downloads" / wf.filename
    cached.parent.mkdir()
    cached.write_bytes(b"placed by a previous verified download")
    assert download.fetch("torchvision", "vgg11", include_top=True) == cached
    monkeypatch.delenv("VGGJAX_CACHE")
    assert str(cache_dir()).endswith(".cache/vggjax")
