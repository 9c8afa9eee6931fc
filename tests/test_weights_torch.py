"""torchvision/timm checkpoints -> vggjax: logit parity with torchvision's VGG, and refusal of bad files.

The reference is vggjax/testing/reference.py (torchvision's VGG module for module) with seeded
random weights, random biases and random BatchNorm running stats, in eval mode. The vgg16 and
vgg16_bn files go through the real path: torch.save / safetensors on disk -> vggjax.convert_file
-> vggjax.load. Run with `pytest -s` to see the measured errors.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vggjax
from helpers import TOL, assert_parity, normal_images as images
from vggjax.testing.reference import random_vgg, randomize, vgg
from vggjax.weights.random_weights import random_variables
from vggjax.weights.torch import feature_indices, from_state_dict, read_torch_file, to_state_dict

def torch_forward(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """`module` on NHWC `x`; 4-D results come back NHWC."""
    with torch.no_grad():
        y = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


def features_only(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A 'notop' state dict: the conv base of a torchvision VGG."""
    return {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("features.")}


def test_feature_indices_are_the_published_torchvision_keys():
    # The conv indices in torchvision's vgg16-397923af.pth and vgg16_bn-6c64b313.pth ...
    assert list(feature_indices("vgg16").values()) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(feature_indices("vgg16_bn").values()) == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37,
                                                          40]
    for arch in ("vgg11", "vgg19_bn"):  # ... and in the reference module the parity tests use
        with torch.device("meta"):  # shapes only
            state = vgg(arch).state_dict()
        convs = [int(k.split(".")[1]) for k, v in state.items()
                 if k.startswith("features.") and k.endswith("weight") and v.ndim == 4]
        assert list(feature_indices(arch).values()) == convs


def test_to_state_dict_is_from_state_dict_backwards():
    for arch, top, classes in (("vgg11_bn", "torchvision", 7), ("vgg11", "timm", 5), ("vgg13_bn", None, 1000)):
        variables = random_variables(arch, top is not None, seed=2, num_classes=classes)
        back, include_top = from_state_dict(to_state_dict(variables, arch, top), arch, f"{arch} {top}")
        assert include_top == (top is not None)
        jax.tree.map(np.testing.assert_array_equal, back, variables)
    with pytest.raises(ValueError, match="variables lack vgg11's params/fc1/bias, params/fc1/kernel"):
        to_state_dict(random_variables("vgg11", include_top=False), "vgg11", "torchvision")


def test_the_torch_reference_holds_the_same_random_numbers_as_ours():
    # One generator: randomize copies random_variables' numbers in, whatever the head's size.
    model = randomize(vgg("vgg11_bn", num_classes=7), seed=3)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    ours, _ = from_state_dict(state, "vgg11_bn", "randomize")
    jax.tree.map(np.testing.assert_array_equal, ours,
                 random_variables("vgg11_bn", include_top=True, seed=3, num_classes=7))
    assert int(state["features.1.num_batches_tracked"]) == 1234


# --- parity: full models through convert_file + load ---------------------------------------

@pytest.fixture(scope="module")
def vgg16(torch_vgg16_files):
    """Random-weight VGG16 as a torchvision .pth and as timm's model.safetensors, and the .pth
    converted and loaded back (conftest.torch_vgg16_files: written once per run)."""
    d = torch_vgg16_files
    return random_vgg("vgg16", seed=0), d, vggjax.load(d / "converted")


def test_vgg16_pth_logits_match_torchvision(vgg16):
    model, _, pretrained = vgg16
    assert pretrained.meta["top_input"] == "torch" and pretrained.meta["preprocessing"] == "torch"
    for size in (224, 160):  # 160: 5x5 features, overlapping adaptive-pool bins up to 7x7
        x = images(2, size, seed=size)
        assert_parity(f"vgg16 .pth -> convert_file -> load, logits {size}x{size}",
                      pretrained.model.apply(pretrained.variables, x), torch_forward(model, x))


def test_fc1_left_in_torch_c_h_w_order_would_be_caught(vgg16):
    model, _, pretrained = vgg16
    # The tempting wrong port: transpose fc1 like any other Linear, leaving its rows in C,H,W order.
    fc1 = model.state_dict()["classifier.0.weight"].numpy()
    params = {**pretrained.params, "fc1": {**pretrained.params["fc1"], "kernel": fc1.T}}
    x = images(2, 224, seed=1)
    wrong = np.asarray(pretrained.model.apply({"params": params}, x))
    err = float(np.abs(wrong - torch_forward(model, x)).max())
    print(f"\nvgg16 with fc1 rows in C,H,W order: max abs logit error {err:.2e}")
    assert err > 1000 * TOL


def test_vgg16_timm_safetensors_logits_match_torchvision(vgg16):
    model, d, pretrained = vgg16
    # read_torch_file is what convert_file calls for --source timm; the orbax round trip around
    # it is already covered by the torchvision tests.
    variables, include_top = read_torch_file(d / "model.safetensors", "vgg16")
    assert include_top
    # 224 only: timm's own model equals torchvision's at 224 (7x7 features; fc1 is the same
    # weights as a 7x7 conv), but above 224 timm's ConvMlp slides fc1 over the larger map and
    # averages afterwards, so there the torchvision reference (and our torch head) rightly differ.
    x = images(2, 224, seed=2)
    assert_parity("vgg16 timm safetensors -> read_torch_file, logits 224x224",
                  pretrained.model.apply(variables, x), torch_forward(model, x))
    # Same weights as the torchvision file, so the two conversions must agree bit for bit.
    jax.tree.map(np.testing.assert_array_equal, variables, pretrained.variables)


@pytest.mark.slow  # a VGG16_BN with top (~45 s); BN parity is default in from_state_dict[vgg19_bn-96]
def test_vgg16_bn_safetensors_logits_match_torchvision(tmp_path):
    model = random_vgg("vgg16_bn", seed=3)
    # torchvision's layout in safetensors (as on the Hugging Face hub), num_batches_tracked included.
    save_file(model.state_dict(), str(tmp_path / "vgg16_bn.safetensors"))
    vggjax.convert_file("torchvision", "vgg16_bn", tmp_path / "vgg16_bn.safetensors", tmp_path / "out",
                        include_top=True)
    pretrained = vggjax.load(tmp_path / "out")
    assert set(pretrained.variables) == {"params", "batch_stats"}
    for size in (224, 256):  # 256: 8x8 features, overlapping 7x7 adaptive-pool bins
        x = images(2, size, seed=size)
        assert_parity(f"vgg16_bn safetensors -> convert_file -> load, logits {size}x{size}",
                      pretrained.model.apply(pretrained.variables, x), torch_forward(model, x))


@pytest.mark.parametrize("arch,size", [("vgg11", 160), ("vgg19_bn", 96)])
def test_from_state_dict_logits_match_torchvision(arch, size):
    model = random_vgg(arch, seed=4)
    variables, include_top = from_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                             arch, source=f"{arch} state dict")
    assert include_top
    x = images(1, size, seed=5)
    ours = vggjax.create(arch, top_input="torch", classifier_activation=None).apply(variables, x)
    assert_parity(f"{arch} from_state_dict, logits {size}x{size}", ours, torch_forward(model, x))


def test_notop_file_gives_the_books_feature_extractor(tmp_path):
    # The transfer-learning use: a conv base only, 150x150 cats-vs-dogs images -> 4x4x512.
    model = random_vgg("vgg11_bn", seed=6)
    save_file({k: torch.from_numpy(v) for k, v in features_only(model).items()},
              str(tmp_path / "notop.safetensors"))
    with pytest.raises(ValueError, match=r"notop.safetensors holds no classifier"):
        vggjax.convert_file("torchvision", "vgg11_bn", tmp_path / "notop.safetensors",
                            tmp_path / "top", include_top=True)
    assert not (tmp_path / "top").exists()
    vggjax.convert_file("torchvision", "vgg11_bn", tmp_path / "notop.safetensors", tmp_path / "out")
    pretrained = vggjax.load(tmp_path / "out")
    x = images(1, 150, seed=7)
    ours = pretrained.model.apply(pretrained.variables, x)
    assert ours.shape == (1, 4, 4, 512)
    assert_parity("vgg11_bn notop safetensors -> convert_file -> load, block5_pool 150x150", ours,
                  torch_forward(model.features, x))


# --- bad state dicts ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg11_base():
    return features_only(vgg("vgg11"))


def test_missing_key_is_named(vgg11_base):
    state = {k: v for k, v in vgg11_base.items() if k != "features.3.bias"}
    with pytest.raises(ValueError, match=r"my.pth is not a torchvision/timm vgg11 state dict.*"
                                         r"missing \['features.3.bias'\]$"):
        from_state_dict(state, "vgg11", "my.pth")


def test_extra_key_is_named(vgg11_base):
    state = {**vgg11_base, "features.99.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected \['features.99.weight'\]"):
        from_state_dict(state, "vgg11", "my.pth")


def test_other_arch_is_named_in_the_error(vgg11_base):
    with pytest.raises(ValueError, match=r"look like vgg11: convert it as vgg11.*unexpected \["):
        from_state_dict(vgg11_base, "vgg16", "my.pth")


def test_wrong_shape_is_named(vgg11_base):
    state = {**vgg11_base, "features.0.weight": np.zeros((64, 3, 5, 5), np.float32)}
    with pytest.raises(ValueError, match=r"features.0.weight: expected shape \(64, 3, 3, 3\), "
                                         r"found \(64, 3, 5, 5\)"):
        from_state_dict(state, "vgg11", "my.pth")


def test_integer_weights_are_refused_not_cast(vgg11_base, tmp_path):
    """An int .pth, and a safetensors file whose header relabels float bytes as int32: both refused."""
    ints = {k: (v * 100).astype(np.int64) for k, v in vgg11_base.items()}
    torch.save({k: torch.from_numpy(v) for k, v in ints.items()}, tmp_path / "ints.pth")
    with pytest.raises(ValueError, match=r"ints.pth holds non-float weights, expected floats: "
                                         r"features.0.weight \(int64\), .* and 12 more"):
        read_torch_file(tmp_path / "ints.pth", "vgg11")
    save_file({k: torch.from_numpy(v) for k, v in vgg11_base.items()}, str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"F32"', b'"I32"')
    (tmp_path / "relabelled.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(ValueError, match=r"relabelled.safetensors holds non-float weights.*\(int32\)"):
        vggjax.convert_file("timm", "vgg11", tmp_path / "relabelled.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def head(layout: str, num_classes: int) -> dict[str, np.ndarray]:
    """Zero classifier tensors as torchvision or timm store them."""
    if layout == "timm":
        return {"pre_logits.fc1.weight": np.zeros((4096, 512, 7, 7), np.float32),
                "pre_logits.fc1.bias": np.zeros(4096, np.float32),
                "pre_logits.fc2.weight": np.zeros((4096, 4096, 1, 1), np.float32),
                "pre_logits.fc2.bias": np.zeros(4096, np.float32),
                "head.fc.weight": np.zeros((num_classes, 4096), np.float32),
                "head.fc.bias": np.zeros(num_classes, np.float32)}
    return {"classifier.0.weight": np.zeros((4096, 25088), np.float32),
            "classifier.0.bias": np.zeros(4096, np.float32),
            "classifier.3.weight": np.zeros((4096, 4096), np.float32),
            "classifier.3.bias": np.zeros(4096, np.float32),
            "classifier.6.weight": np.zeros((num_classes, 4096), np.float32),
            "classifier.6.bias": np.zeros(num_classes, np.float32)}


def test_fc1_stored_transposed_is_refused_not_reshaped(vgg11_base):
    # Same element count as the right shape: a reshape-based converter would take it silently.
    state = {**vgg11_base, **head("torchvision", 1000)}
    state["classifier.0.weight"] = state["classifier.0.weight"].T
    with pytest.raises(ValueError, match=r"classifier.0.weight: expected shape \(4096, 25088\), "
                                         r"found \(25088, 4096\)"):
        from_state_dict(state, "vgg11", "my.pth")


def test_fine_tuned_timm_head_keeps_its_classes(vgg11_base):
    variables, include_top = from_state_dict({**vgg11_base, **head("timm", 2)}, "vgg11", "cats.pth")
    assert include_top
    assert variables["params"]["predictions"]["kernel"].shape == (4096, 2)
    assert variables["params"]["fc1"]["kernel"].shape == (25088, 4096)
    assert variables["params"]["fc2"]["kernel"].shape == (4096, 4096)


def test_fine_tuned_head_converts_with_its_class_count(vgg11_base, tmp_path):
    from safetensors.numpy import save_file as save_numpy

    save_numpy({**vgg11_base, **head("torchvision", 2)}, str(tmp_path / "cats.safetensors"))
    meta = vggjax.convert_file("torchvision", "vgg11", tmp_path / "cats.safetensors", tmp_path / "out",
                               include_top=True)
    assert meta["num_classes"] == 2
    pt = vggjax.load(tmp_path / "out")
    assert pt.model.num_classes == 2
    assert pt.model.apply(pt.variables, images(1, 64, seed=0)).shape == (1, 2)


def test_half_a_head_and_mixed_layouts_are_refused(vgg11_base):
    partial = {k: v for k, v in head("torchvision", 1000).items() if not k.startswith("classifier.6")}
    with pytest.raises(ValueError, match=r"torchvision vgg11 state dict: missing "
                                         r"\['classifier.6.bias', 'classifier.6.weight'\]"):
        from_state_dict({**vgg11_base, **partial}, "vgg11", "my.pth")
    with pytest.raises(ValueError, match="mixes torchvision"):
        from_state_dict({**vgg11_base, **partial, "head.fc.bias": np.zeros(2)}, "vgg11", "my.pth")


# --- bad files ------------------------------------------------------------------------------

class RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pth_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"  # zip-format torch file, tensors plus one code-running object
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "x": RunsCode(f"touch {marker}")}, evil)
    with pytest.raises(ValueError, match=r"evil.pth refused for safety: unpickling it would call "
                                         r"posix.system"):
        read_torch_file(evil, "vgg11")
    with pytest.raises(ValueError, match="refused for safety") as err:
        vggjax.convert_file("torchvision", "vgg11", evil, tmp_path / "out")
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,content,message", [
    ("empty.pth", b"", r"empty.pth is empty"),
    ("garbage.pth", b"<html>404 Not Found</html>" * 20, r"garbage.pth is not a readable PyTorch file"),
    ("binary.pth", bytes(range(256)) * 4, r"binary.pth is not a readable PyTorch file"),
    ("garbage.safetensors", b"\x10" * 200, r"garbage.safetensors is not a readable safetensors file"),
    ("weights.h5", b"\x89HDF\r\n", r"weights.h5: expected a .pth, .pt, .bin, .safetensors file"),
])
def test_unreadable_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_torch_file(tmp_path / name, "vgg11")
    assert "weights_only=False" not in str(err.value)  # never advise loading code-running pickles


def test_pth_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth holds a list, expected a state dict"):
        read_torch_file(tmp_path / "list.pth", "vgg11")
    torch.save({"epoch": 3, "state_dict": {"features.0.weight": torch.zeros(1)}}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"entries \['epoch', 'state_dict'\] are not named tensors"):
        read_torch_file(tmp_path / "ckpt.pth", "vgg11")


def test_pth_and_safetensors_read_without_torch(tmp_path, vgg11_base, subprocess_env):
    state = {k: torch.from_numpy(v) for k, v in vgg11_base.items()}
    save_file(state, str(tmp_path / "notop.safetensors"))
    torch.save(state, tmp_path / "notop.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    script = f"""
import sys
import numpy as np
import vggjax, vggjax.weights.torch as tw
assert "torch" not in sys.modules, "importing vggjax imported torch"
sys.modules["torch"] = None  # as if torch were not installed
read = [tw.read_torch_file({str(tmp_path)!r} + "/" + name, "vgg11")
        for name in ("notop.safetensors", "notop.pth", "legacy.pth")]
for variables, include_top in read:
    assert not include_top and variables["params"]["block5_conv2"]["kernel"].shape == (3, 3, 512, 512)
    for a, b in zip(*(vggjax.utils.trees.flatten(v).values() for v in (read[0][0], variables))):
        np.testing.assert_array_equal(a, b)
print("read", len(read))
"""
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "read 3" in out.stdout
