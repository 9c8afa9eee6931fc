"""torchvision's VGG, module for module: the PyTorch reference of the weight-porting tests and the
benchmarks (one copy for both). It imports torch when imported; `import vggjax`
never loads it.

torchvision itself is not installed here (its PyPI wheels pin a CUDA torch), so this rebuilds
`torchvision/models/vgg.py`: the same cfgs, the same `features` Sequential (hence the same
state-dict keys), `avgpool` AdaptiveAvgPool2d((7, 7)) and `classifier`. `timm_state_dict` gives
the same weights in timm's layout (what timm's `_filter_fn` produces from a torchvision file).
"""
from __future__ import annotations

import torch
from torch import nn

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


@torch.no_grad()
def randomize(model: VGG, seed: int) -> VGG:
    """Seeded random weights that keep activations O(1) and give logits of a few units.

    Biases and every BatchNorm tensor are random too (running stats included), so a
    converter that drops or swaps any of them changes the logits.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            gain = 1.0 if m is model.classifier[-1] else 2.0  # He init where a ReLU follows
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (gain / m.weight[0].numel()) ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            m.num_batches_tracked.fill_(1234)
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
