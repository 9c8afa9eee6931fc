"""VGG's two poolings: the 2x2 max pool ending each block, with a fast exact gradient, and
torchvision's adaptive average pool to 7x7 in front of its classifier."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TORCH_GRID = 7  # torchvision's AdaptiveAvgPool2d((7, 7)): the grid its classifier reads


@jax.custom_jvp
def _pool2x2(x):
    n, h, w, c = x.shape
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


@_pool2x2.defjvp
def _pool2x2_jvp(primals, tangents):
    # The tangent is linear in t through a one-hot mask of each window's first maximum, so
    # reverse mode (its transpose) is one broadcast-and-select: no select-and-scatter, which
    # XLA:CPU runs slowly.
    (x,), (t,) = primals, tangents
    y = _pool2x2(x)
    n, h, w, c = x.shape
    x6, t6 = (a.reshape(n, h // 2, 2, w // 2, 2, c) for a in (x, t))
    # Corners compared with y as is (no broadcast of y to x's size); the first maximum in
    # row-major window order takes the whole gradient (as XLA's select-and-scatter, TF and
    # torch do), not a share split among ties.
    e00, e01, e10 = (x6[:, :, i, :, j] == y for i, j in ((0, 0), (0, 1), (1, 0)))
    first = jnp.where(e00, 0, jnp.where(e01, 1, jnp.where(e10, 2, 3))).astype(jnp.int8)
    corner = jnp.arange(4, dtype=jnp.int8).reshape(2, 1, 2, 1)  # window row, -, column, -
    onehot = first[:, :, None, :, None, :] == corner
    return y, jnp.where(onehot, t6, jnp.zeros((), t.dtype)).sum(axis=(2, 4))


def max_pool2x2(x):
    """VGG's 2x2 stride-2 VALID max pool: (N, H, W, C) -> (N, H//2, W//2, C), any float dtype.

    Equal to `nn.max_pool(x, (2, 2), strides=(2, 2))` in values and gradients: an odd last
    row/column is dropped, a tied window sends its whole gradient to its first maximum in
    row-major order. The gradient is a mask instead of XLA:CPU's slow select-and-scatter.
    A window holding NaN pools to NaN and sends its gradient to its last element (XLA's
    choice there depends on where the NaN sits).
    """
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return _pool2x2(x[:, :h, :w])


def torch_pool(x):
    """torchvision's AdaptiveAvgPool2d((7, 7)) in front of its classifier: (N, H, W, C) ->
    (N, 7, 7, C), the identity on a 7x7 grid (224x224 images)."""
    if x.shape[1:3] == (TORCH_GRID, TORCH_GRID):
        return x
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], TORCH_GRID), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], TORCH_GRID), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 averaging matrix with torch's AdaptiveAvgPool bin edges.

    Bin i covers [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)), so bins overlap when n_in is not
    a multiple of n_out, exactly as torchvision's head sees them.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m
