"""Padded batches: every split's last batch and `predict`'s, padded to the full batch size with a mask."""
from __future__ import annotations

from typing import Mapping

import numpy as np


def pad_batch(arrays: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`arrays` ({key: (n, ...)}, n <= size) zero-padded to `size` rows, plus "mask" bool
    (size,): True on the n real rows. The one padding rule of every split."""
    n = len(next(iter(arrays.values())))
    out = {}
    for key, value in arrays.items():
        out[key] = np.zeros((size, *value.shape[1:]), value.dtype)
        out[key][:n] = value
    return dict(out, mask=np.arange(size) < n)
