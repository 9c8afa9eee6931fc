"""Padded batches: every split's last batch and `predict`'s, padded to the full batch size with a mask
(`pad_batch`), and a function run on such a batch (`run_padded`)."""
from __future__ import annotations

from typing import Callable, Mapping

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


def run_padded(fn: Callable[[np.ndarray], object], rows: np.ndarray, size: int) -> np.ndarray:
    """`fn` ((size, ...) -> (size, ...)) on `rows` (n, ...), n <= size, zero-padded to `size` rows
    (`pad_batch`): a jitted `fn` then sees one shape for every batch, the short last one included,
    and compiles once. Returns fn's n real rows as a NumPy array (n, ...), in `rows`' order.
    The one "predict in padded batches" step of `classifier.predict` and `predict_files`."""
    batch = pad_batch({"rows": rows}, size)
    return np.asarray(fn(batch["rows"]))[batch["mask"]]
