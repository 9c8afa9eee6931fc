"""Optional dependencies: importing one that is not installed says which vggjax extra brings it."""
from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the pyproject extra that installs it
EXTRAS = {"tensorflow": "train", "tensorflow_datasets": "train", "matplotlib": "train",
          "PIL": "train", "torch": "torch", "onnx": "export", "onnxruntime": "export", "jax2onnx": "export", "grain": "grain",
          "simplejpeg": "grain", "huggingface_hub": "hub", "tensorboardX": "train"}


def require(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or ImportError "<purpose> needs <package>: pip install
    'vggjax[<extra>]'" when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} needs {package}, which is not installed: "
                          f"pip install 'vggjax[{EXTRAS[package]}]'") from err
