"""Where the official VGG weight files live, their checksums, and a verified, cached download."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.request
from pathlib import Path

from vggjax.utils import atomic
from vggjax.utils.cache import cache_dir
from vggjax.utils.progress import progress_bar

KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
# (arch, include_top) -> (path under KERAS_URL, md5): keras/src/applications/vgg16.py, vgg19.py.
KERAS_FILES = {
    ("vgg16", True): ("vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
                      "64373286793e3c8b2b4e3219cbf3544b"),
    ("vgg16", False): ("vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "6d6bbae143d832006294945121d1f1fc"),
    ("vgg19", True): ("vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5",
                      "cbe5617147190e668d6c5d5026f83318"),
    ("vgg19", False): ("vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
                       "253f8cb515780f3b799900260a226db6"),
}
# The only VGGs keras.applications publishes weights for: ("vgg16", "vgg19").
KERAS_ARCHS = tuple(dict.fromkeys(arch for arch, _ in KERAS_FILES))
TORCHVISION_URL = "https://download.pytorch.org/models/"
# torchvision names each file with the first 8 hex digits of its sha256 (torch.hub checks them).
TORCHVISION_FILES = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}
TIMM_PAGE = "https://huggingface.co/timm/{arch}.tv_in1k"
TIMEOUT_S = 10.0
# How messages name the converter: the installed command (`python tools/convert_weights.py`
# in a checkout runs the same code with the same flags).
CONVERT_COMMAND = "vggjax convert"


class DownloadError(OSError):
    """The weights could not be fetched, or what arrived does not match the pinned checksum."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """An official weights file: its URL and the checksum (full hex, or a hex prefix) it must have."""

    url: str
    algorithm: str  # "md5" or "sha256"
    digest: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def check_keras_arch(arch: str) -> None:
    """ValueError unless Keras publishes weights for `arch` (KERAS_ARCHS)."""
    if arch not in KERAS_ARCHS:
        raise ValueError(f"Keras publishes VGG weights only for {' and '.join(KERAS_ARCHS)}, not "
                         f"{arch!r}; use --source torchvision for the other VGGs")


def official_file(source: str, arch: str, include_top: bool) -> WeightFile:
    """The official file for `source` ("keras", "torchvision") and `arch`.

    torchvision publishes only full models (include_top is then irrelevant); timm has no
    checksum pinned here, so it raises ValueError saying to pass the file with --input.
    """
    if source == "keras":
        check_keras_arch(arch)
        name, md5 = KERAS_FILES[arch, include_top]
        return WeightFile(KERAS_URL + name, "md5", md5)
    if source == "torchvision":
        if arch not in TORCHVISION_FILES:
            raise ValueError(f"torchvision has no VGG called {arch!r}; "
                             f"expected one of {sorted(TORCHVISION_FILES)}")
        name = TORCHVISION_FILES[arch]
        return WeightFile(TORCHVISION_URL + name, "sha256", name.rsplit("-", 1)[1].split(".")[0])
    if source == "timm":
        raise ValueError(
            f"timm weights have no checksum pinned in vggjax, so they are not downloaded for you: "
            f"get model.safetensors from {TIMM_PAGE.format(arch=arch)} and convert it with "
            f"`{CONVERT_COMMAND} --source timm --arch {arch} --input FILE`")
    raise ValueError(f"unknown weights source {source!r}; expected keras, torchvision or timm")


def matches(digest: str, expected: str) -> bool:
    """True when `digest` is `expected` or starts with it (torchvision pins 8-hex prefixes)."""
    return len(expected) >= 8 and digest.lower().startswith(expected.lower())


def download(url: str, dest: str | os.PathLike, algorithm: str, expected: str,
             timeout: float = TIMEOUT_S, progress: bool = True) -> Path:
    """Fetch `url` to `dest` only if its checksum matches `expected`.

    Streams into a hidden temp file next to `dest` (`atomic.writing`), hashing on the way, and
    renames it into place only after the check, so `dest` never holds a partial or wrong file.
    Raises DownloadError (with the temp file deleted) when offline, on timeout or on a mismatch.
    `progress`: a bar in bytes (`vggjax.utils.progress`), as Keras' get_file shows.
    """
    with atomic.writing(dest) as tmp:
        h = hashlib.new(algorithm)
        with open(tmp, "wb") as out:
            try:
                with (urllib.request.urlopen(url, timeout=timeout) as response,
                      progress_bar(total=_size(response), desc=f"downloading {Path(dest).name}", unit="B",
                                   unit_scale=True, unit_divisor=1024, enabled=progress) as bar):
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            except OSError as err:  # URLError, timeouts and refused connections are OSErrors
                raise DownloadError(
                    f"could not download {url} ({err}). If this machine is offline, download "
                    f"that file elsewhere, copy it here and convert it with `{CONVERT_COMMAND} "
                    f"--input FILE` (in Python: convert_file(..., input_path=FILE))") from None
        if not matches(h.hexdigest(), expected):
            raise DownloadError(f"{url} does not have the expected {algorithm} {expected} "
                                f"(got {h.hexdigest()}); the download was discarded")
    return Path(dest)


def _size(response) -> int | None:
    """The bytes a response announces (Content-Length; file:// URLs too), None when unknown."""
    size = response.headers.get("Content-Length", "")
    return int(size) if size.isdigit() else None


def fetch(source: str, arch: str, include_top: bool, timeout: float = TIMEOUT_S,
          progress: bool = True) -> Path:
    """Path of the official file in `cache_dir()/downloads`, downloaded and verified if absent.

    Only verified files are ever renamed into the cache, so a cached file is trusted as is.
    """
    wf = official_file(source, arch, include_top)
    dest = cache_dir() / "downloads" / wf.filename
    if dest.is_file():
        return dest
    return download(wf.url, dest, wf.algorithm, wf.digest, timeout, progress)
