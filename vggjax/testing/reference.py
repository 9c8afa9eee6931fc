"""torchvision's VGG, module for module: the PyTorch reference of the weight-porting tests and the
benchmarks (one copy for both). It imports torch when imported; `import vggjax`
never loads it.

torchvision itself is not installed here (its PyPI wheels pin a CUDA torch), so this rebuilds
`torchvision/models/vgg.py`: the same cfgs, the same `features` Sequential (hence the same
state-dict keys), `avgpool` AdaptiveAvgPool2d((7, 7)) and `classifier`. `timm_state_dict` gives
the same weights in timm's layout (what timm's `_filter_fn` produces from a torchvision file).

The `lpips` and pytorch-grad-cam packages (test-only references installed with --no-deps) run
their own code unchanged: they import torchvision for its VGG (and a few names they never call
here), which `torchvision_standin` serves from this file (`import_lpips`, `reference_lpips`,
`run_lpips`; `install_torchvision_standin` before importing pytorch_grad_cam).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn

from vggjax.model.vgg import find_arch
from vggjax.weights.random_weights import random_variables
from vggjax.weights.torch import to_state_dict

# torchvision's cfgs: ints are conv widths, "M" a 2x2 max pool.
CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512,
          512, "M"],
}
ARCH_CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def make_layers(cfg: list, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(arch: str, num_classes: int = 1000) -> VGG:
    """torchvision.models.<arch>(weights=None), e.g. vgg("vgg16_bn")."""
    name, _, bn = arch.partition("_")
    return VGG(make_layers(CFGS[ARCH_CFG[name]], batch_norm=bn == "bn"), num_classes)


def _arch(model: VGG) -> str | None:
    """The vggjax arch name of `model` ("vgg16", "vgg11_bn", ...) from its `features`."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.features)
    batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.features)
    return find_arch(convs, batch_norm)


@torch.no_grad()
def randomize(model: VGG, seed: int) -> VGG:
    """`model` with `weights.random_weights.random_variables(arch, seed=seed)`: the numbers
    vggjax's own tests draw, copied in through `weights.torch.to_state_dict`, so activations
    stay O(1) on torch-preprocessed inputs and logits are a few units.

    Biases and every BatchNorm tensor are random too (running stats included), so a
    converter that drops or swaps any of them changes the logits. A `classifier` without a
    final Linear (lpips's trunk) is the conv base only; the head's size is the model's own.
    """
    arch, head = _arch(model), model.classifier[-1]
    top = isinstance(head, nn.Linear)
    variables = random_variables(arch, include_top=top, seed=seed,
                                 num_classes=head.out_features if top else 1000)
    state = to_state_dict(variables, arch, "torchvision" if top else None)
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    # Every tensor but BatchNorm's step counters must have come from `state`: none left as it was.
    left = [k for k in result.missing_keys if not k.endswith(".num_batches_tracked")]
    if left or result.unexpected_keys:
        raise ValueError(f"{arch}: not randomised {left}, unexpected {result.unexpected_keys}")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(1234)  # as a trained model's: readers must skip it, not expect 0
    return model.eval()


def timm_state_dict(model: VGG) -> dict[str, torch.Tensor]:
    """The model's weights under timm's VGG keys: ConvMlp pre_logits (fc1 as a 7x7 conv, fc2 as
    a 1x1 conv) and head.fc, exactly as timm's `_filter_fn` rewrites a torchvision file."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "classifier.0.weight":
            value = value.reshape(value.shape[0], 512, 7, 7)
        elif key == "classifier.3.weight":
            value = value.reshape(value.shape[0], value.shape[1], 1, 1)
        key = (key.replace("classifier.0", "pre_logits.fc1").replace("classifier.3", "pre_logits.fc2")
               .replace("classifier.6", "head.fc"))
        out[key] = value.contiguous()
    return out


def save_timm_safetensors(model: VGG, path) -> None:
    """Write the model as timm's `model.safetensors` would hold it."""
    from safetensors.torch import save_file

    save_file(timm_state_dict(model), str(path))


def random_vgg(arch: str, seed: int) -> VGG:
    """`randomize(vgg(arch), seed)` without first paying for torch's default init."""
    with torch.device("meta"):
        model = vgg(arch)
    return randomize(model.to_empty(device="cpu"), seed)


def write_lpips_trunk(directory, seed: int):
    """A seeded random VGG16 conv base (what lpips uses: `features` only) as torchvision's .pth,
    converted by vggjax: returns (torch module, converted weights dir); kept if already there."""
    import vggjax

    with torch.device("meta"):
        model = vgg("vgg16")
    model.classifier = nn.Sequential(nn.Identity())  # no time spent on the unused 120M-weight head
    model = randomize(model.to_empty(device="cpu"), seed)
    converted = Path(directory) / "converted"
    if not converted.exists():
        torch.save(model.features.state_dict(prefix="features."), Path(directory) / "vgg16.pth")
        vggjax.convert_file("torchvision", "vgg16", Path(directory) / "vgg16.pth", converted)
    return model, converted


def torchvision_standin(trunk: torch.nn.Module | None = None) -> types.ModuleType:
    """A `torchvision` module for the reference packages that import it (lpips, pytorch-grad-cam).

    `models.vgg11` ... `vgg19` build this file's VGG (`vgg16` returns `trunk` when one is given);
    the few other names those packages import raise if they are ever called.
    """
    def unused(*_, **__):
        raise NotImplementedError("the torchvision stand-in only provides models.vgg*")

    def builder(arch):
        def build(pretrained=False, weights=None, **_):
            if pretrained or weights is not None:
                raise RuntimeError("the torchvision stand-in has no ImageNet weights (lpips: pnet_rand=True)")
            return trunk if arch == "vgg16" and trunk is not None else vgg(arch)
        return build

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    for arch in ARCH_CFG:
        setattr(tv.models, arch, builder(arch))
    tv.ops = types.SimpleNamespace(box_iou=unused)
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Compose = tv.transforms.Normalize = tv.transforms.ToTensor = unused
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    tv.transforms.functional.resize = unused
    return tv


def _standin_modules(tv: types.ModuleType) -> dict[str, types.ModuleType]:
    return {"torchvision": tv, "torchvision.models": tv.models, "torchvision.transforms": tv.transforms,
            "torchvision.transforms.functional": tv.transforms.functional}


def install_torchvision_standin() -> None:
    """Register `torchvision_standin()` in sys.modules unless a torchvision is already there
    (before importing pytorch_grad_cam, which imports torchvision at its top)."""
    if "torchvision" not in sys.modules:
        sys.modules.update(_standin_modules(torchvision_standin()))


def import_lpips(trunk: torch.nn.Module | None = None):
    """The lpips package, its `torchvision.models` (pretrained_networks.tv) serving `trunk`."""
    tv = torchvision_standin(trunk)
    modules = _standin_modules(tv)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        import lpips
        from lpips import pretrained_networks
    finally:  # nothing else in the session sees this trunk's stand-in
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    pretrained_networks.tv = tv.models  # lpips binds `tv` once, at its first import
    return lpips


def reference_lpips(trunk: torch.nn.Module, version: str = "0.1", spatial: bool = False):
    """`lpips.LPIPS(net="vgg", version=...)` with `trunk` (a `vgg("vgg16")` here) as its VGG and
    the lin weights of its wheel; `pnet_rand=True` so nothing is downloaded."""
    lpips = import_lpips(trunk)
    return lpips.LPIPS(net="vgg", version=version, pnet_rand=True, spatial=spatial,
                       verbose=False).eval()


def run_lpips(net, x0, x1, normalize: bool = False):
    """`net(x0, x1)` on NHWC NumPy images; returns NumPy (N,) or the (N, H, W) spatial map."""
    with torch.no_grad():
        d = net(*(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in (x0, x1)),
                normalize=normalize).numpy()
    return d[:, 0] if net.spatial else d[:, 0, 0, 0]
