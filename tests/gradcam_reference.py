"""pytorch-grad-cam as a reference: it imports torchvision, which PyPI cannot install beside this
torch, so `torchvision_standin()` registers a module whose `models.vgg*` are torch_reference's."""
import sys
import types

import torch_reference


def torchvision_standin() -> None:
    """Register `torchvision` (models.vgg11/13/16/19; transforms and ops that raise if used)."""
    if "torchvision" in sys.modules:
        return

    def unused(*_, **__):
        raise NotImplementedError("the torchvision stand-in only provides models.vgg*")

    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(**{a: (lambda a=a: torch_reference.vgg(a))
                                         for a in ("vgg11", "vgg13", "vgg16", "vgg19")})
    tv.ops = types.SimpleNamespace(box_iou=unused)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = transforms.Normalize = transforms.ToTensor = unused
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = unused
    tv.transforms, transforms.functional = transforms, functional
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
