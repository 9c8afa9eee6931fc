"""timm's VGG weights from the Hugging Face Hub: fetched by huggingface_hub at a pinned commit
into the Hub's own cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub), so the Hub's offline
mode (HF_HUB_OFFLINE=1) reads that cache and nothing else."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from vggjax.model.vgg import ARCHS
from vggjax.utils.extras import require
from vggjax.weights.download import DownloadError

REPO = "timm/{arch}.tv_in1k"  # timm's port of the torchvision ImageNet weights, one repo per arch
FILENAME = "model.safetensors"
# arch -> the Hub commit (40 hex digits) its weights are read at: reproducible, and the Hub
# serves that commit's file whatever is pushed later. NOT FILLED IN: vggjax was written on a
# machine without access to the Hub, and a commit cannot be known without it. Copy each from
# https://huggingface.co/timm/<arch>.tv_in1k/commits/main after checking the file; until
# then the commit is given with `revision=` (`vggjax convert --revision SHA`).
REVISIONS: dict[str, str] = {}
SHA_RE = re.compile(r"[0-9a-f]{40}")


def revision_for(arch: str, revision: str | None = None) -> str:
    """The commit to read `arch` at: `revision` when given, else the pinned one; ValueError
    (one line, saying where to find one) when there is neither or it is not a commit sha."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    revision = revision or REVISIONS.get(arch)
    page = f"https://huggingface.co/{REPO.format(arch=arch)}/commits/main"
    if revision is None:
        raise ValueError(f"no Hub commit is pinned for timm {arch} in vggjax: give one with "
                         f"--revision SHA (from {page}), or the file with --input FILE")
    if not SHA_RE.fullmatch(revision):
        raise ValueError(f"--revision {revision!r} is not a commit sha (40 hex digits, from {page}); "
                         "a branch or tag could change under you")
    return revision


def fetch(arch: str, revision: str | None = None) -> Path:
    """Path of timm's `arch` model.safetensors at the pinned commit, in the Hub's cache,
    downloaded by huggingface_hub when absent (never with HF_HUB_OFFLINE=1). A cached file
    whose content no longer has the sha256 the Hub named it by is refused. Raises DownloadError
    (one line) when it cannot be had."""
    revision = revision_for(arch, revision)
    hf = require("huggingface_hub", "downloading timm weights")
    constants = require("huggingface_hub.constants", "downloading timm weights")
    repo = REPO.format(arch=arch)
    try:
        path = Path(hf.hf_hub_download(repo, FILENAME, revision=revision))
    except Exception as err:  # offline and not cached, unknown repo or commit, network errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        offline = " (HF_HUB_OFFLINE is set: only the Hub cache is read)" if constants.HF_HUB_OFFLINE else ""
        raise DownloadError(f"could not get {FILENAME} of {repo} at {revision}{offline}: {first}. "
                            "Copy the file here and convert it with --input FILE") from None
    _check_blob(path)
    return path


def _check_blob(path: Path) -> None:
    """The Hub stores a large file as blobs/<its sha256>: a cached copy must still hash to it."""
    blob = Path(os.path.realpath(path))
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return  # a small file, named by its git blob hash instead
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != blob.name:
        raise DownloadError(f"{path} (cached as {blob}) does not have the sha256 the Hub gave it "
                            f"(found {h.hexdigest()}): delete it and download again")
