"""Nested dicts of arrays (variables, checkpoints, state dicts): '/'-joined names, the one tree
diff every checker reports with, and a content digest."""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": x}} -> {"a/b": x}: the '/'-joined names used in errors, masks and logs."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """Inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _shape(leaf) -> tuple:
    return tuple(leaf) if isinstance(leaf, tuple) else tuple(np.shape(leaf))


def diff(have: Mapping, want: Mapping) -> list[str]:
    """What keeps `have` from matching `want`, as messages: missing names, unexpected names and
    every shape that differs ("path: expected shape (3, 3, 3, 64), found (3, 3, 64, 3)").

    Both are nested or flat dicts; leaves are arrays, `jax.ShapeDtypeStruct`s or shape tuples.
    An empty list means the names and shapes match.
    """
    have_flat = {k: _shape(v) for k, v in flatten(have).items()}
    want_flat = {k: _shape(v) for k, v in flatten(want).items()}
    problems = []
    if missing := sorted(set(want_flat) - set(have_flat)):
        problems.append(f"missing {missing}")
    if unexpected := sorted(set(have_flat) - set(want_flat)):
        problems.append(f"unexpected {unexpected}")
    problems += [f"{k}: expected shape {want_flat[k]}, found {have_flat[k]}"
                 for k in sorted(set(want_flat) & set(have_flat)) if want_flat[k] != have_flat[k]]
    return problems


def non_finite(tree: Mapping) -> list[str]:
    """Names of the float leaves that hold NaN or Inf."""
    return [path for path, leaf in sorted(flatten(tree).items())
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(leaf))]


def digest(tree: Mapping) -> str:
    """sha256 hex of every leaf's name, dtype, shape and bytes, in name order: the content's identity."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten(tree).items()):
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}:{array.dtype}:{array.shape}\n".encode())
        h.update(array.reshape(-1).view(np.uint8))  # any dtype, bfloat16 included
    return h.hexdigest()
