"""The `lpips` package (pip, BSD-2) as the reference, its own code unchanged.

lpips needs one thing from torchvision, `torchvision.models.vgg16(pretrained=...).features`, and
PyPI torchvision does not import beside this CPU torch; a stand-in `torchvision.models` serves
it from vggjax.testing (torchvision's VGG module for module) while lpips builds its net.
"""
from __future__ import annotations

import sys
import types

import torch


def _stand_in(trunk: torch.nn.Module | None) -> types.ModuleType:
    """A `torchvision.models` whose vgg16(pretrained=False) returns `trunk`."""
    def vgg16(pretrained=False, **_):
        if pretrained or trunk is None:
            raise RuntimeError("the torchvision stand-in has no ImageNet weights (use pnet_rand=True)")
        return trunk

    models = types.ModuleType("torchvision.models")
    models.vgg16 = vgg16
    return models


def import_lpips(trunk: torch.nn.Module | None = None):
    """The lpips package, its `torchvision.models` (pretrained_networks.tv) serving `trunk`."""
    models = _stand_in(trunk)
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
    sys.modules.update({"torchvision": torchvision, "torchvision.models": models})
    try:
        import lpips
        from lpips import pretrained_networks
    finally:  # nothing else in the session sees the stand-in
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    pretrained_networks.tv = models  # lpips binds `tv` once, at its first import
    return lpips


def reference_lpips(trunk: torch.nn.Module, version: str = "0.1", spatial: bool = False):
    """`lpips.LPIPS(net="vgg", version=...)` with `trunk` (a vggjax.testing VGG16) as its VGG and
    the lin weights of its wheel; `pnet_rand=True` so nothing is downloaded."""
    lpips = import_lpips(trunk)
    return lpips.LPIPS(net="vgg", version=version, pnet_rand=True, spatial=spatial,
                       verbose=False).eval()


def run(net, x0, x1, normalize: bool = False):
    """`net(x0, x1)` on NHWC NumPy images; returns NumPy (N,) or the (N, H, W) spatial map."""
    with torch.no_grad():
        d = net(*(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x0, x1)),
                normalize=normalize).numpy()
    return d[:, 0] if net.spatial else d[:, 0, 0, 0]
