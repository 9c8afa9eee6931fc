"""Refusing input that cannot mean anything, eagerly: NaN/Inf, values on the wrong scale, channels
in the wrong axis. Each check looks at concrete arrays only; inside `jax.jit` (traced values)
nothing can be checked and nothing is, so a jitted caller checks its inputs before the call."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np


def traced(x) -> bool:
    """True for a value traced by `jax.jit`/`grad`/`vmap`: its numbers are unknown, so no check
    can look at them (the checks here, and `weights.preprocessing.prepare_images`, skip it)."""
    return isinstance(x, jax.core.Tracer)


def check_nhwc(x, what: str) -> None:
    """ValueError unless `x` is a batch of RGB images (N, H, W, 3): NCHW named as such."""
    shape = tuple(np.shape(x))
    if len(shape) != 4 or shape[-1] != 3:
        hint = "; it looks like NCHW: pass x.transpose(0, 2, 3, 1)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{what} expects NHWC RGB images (N, H, W, 3), found shape {shape}{hint}")


def check_finite(x, what: str) -> None:
    """ValueError when the concrete array `x` holds NaN or Inf."""
    if traced(x) or not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return
    if not bool(jnp.isfinite(x).all()):
        raise ValueError(f"{what} holds NaN or Inf")


def check_range(x, low: float, high: float, what: str, hint: str = "") -> None:
    """ValueError if the concrete array `x` holds NaN/Inf or lies far outside [low, high].

    "Far" is by more than half the range's width, which catches 0..255 images passed where
    [-1, 1] or [0, 1] is expected but lets generator outputs overshoot a little.
    """
    if traced(x):
        return
    check_finite(x, what)
    slack = (high - low) / 2
    lo, hi = float(jnp.min(x)), float(jnp.max(x))  # works on sharded arrays too
    if lo < low - slack or hi > high + slack:
        raise ValueError(f"{what} expects values in [{low:g}, {high:g}], found [{lo:g}, {hi:g}]{hint}")


def warn_if_raw(x, what: str) -> None:
    """Warn when `x` has an integer dtype where preprocessed floats are expected (raw pixels
    that skipped `vggjax.preprocess_input`): the result would be of another input."""
    if not traced(x) and jnp.issubdtype(jnp.result_type(x), jnp.integer):
        warnings.warn(f"{what} got {jnp.result_type(x)} images: it expects preprocessed floats "
                      "(vggjax.preprocess_input(images, mode)); the result is of raw pixels",
                      UserWarning, stacklevel=3)
