"""Winograd F(m x m, 3 x 3) convolution: VGG's 3x3 stride-1 SAME conv with fewer multiplies."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# Lavin & Gray (2016), points 0, +-1 (F(2,3)) and 0, +-1, +-2 (F(4,3)). Each entry is
# (B^T, G, A^T): input transform (a x a), kernel transform (a x 3), output transform (m x a),
# with a = m + 2. The elementwise stage then costs a^2 / m^2 multiplies per output instead
# of 9: 2.25x fewer for F(2,3), 4x fewer for F(4,3).
MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
TILES = tuple(MATRICES)


def _apply(mat, parts, axis: int = 0):
    """sum_i mat[:, i] * parts[i], stacked along a new `axis`.

    One broadcast-multiply-add chain: XLA fuses it into a single pass (a dot with K = a
    or a stack of per-row sums would each cost a pass, or a kernel launch, per row)."""
    mat = np.asarray(mat, np.float32)
    acc = None
    for col, part in zip(mat.T, parts):
        shape = [1] * (part.ndim + 1)
        shape[axis] = len(col)
        term = jnp.asarray(col, part.dtype).reshape(shape) * jnp.expand_dims(part, axis)
        acc = term if acc is None else acc + term
    return acc


def _strided(x, axis: int, start: int, step: int, count: int):
    """x[start : start + step * count : step] along `axis`."""
    return lax.slice_in_dim(x, start, start + step * (count - 1) + 1, step, axis)


def transform_kernel(kernel, tile: int = 4):
    """(3, 3, Cin, Cout) HWIO kernel -> (a*a, Cin, Cout) Winograd-domain kernel G g G^T."""
    _, g, _ = MATRICES[tile]
    # One (a*a x 9) @ (9 x Cin*Cout) matmul: a single pass over the kernel, where elementwise
    # code would fuse into a slow a*a-way gather.
    gg = jnp.asarray(np.kron(np.asarray(g), np.asarray(g)), kernel.dtype)
    u = jnp.matmul(gg, kernel.reshape(9, -1), precision=lax.Precision.HIGHEST)
    return u.reshape(-1, *kernel.shape[2:])


def _input_transform(xc, tile: int, th: int, tw: int):
    """B^T d B of every tile of a padded image batch (N, th*m + 2, tw*m + 2, C) -> (a*a, N*th*tw, C)."""
    bt, a = MATRICES[tile][0], tile + 2
    # Separably: tile t starts at padded row t*m, so "row i of every tile" is one strided
    # slice; rows first (axis 1), then columns (axis 3 once the rows are stacked in front).
    v = _apply(bt, [_strided(xc, 1, i, tile, th) for i in range(a)])
    v = _apply(bt, [_strided(v, 3, j, tile, tw) for j in range(a)], axis=1)
    return v.reshape(a * a, -1, xc.shape[-1])


def _output_transform(m, tile: int, g: int, th: int, tw: int):
    """A^T m A of every tile: (a*a, G*th*tw, C) -> the (G, th*m, tw*m, C) image."""
    at, a, c = MATRICES[tile][2], tile + 2, m.shape[-1]
    m = m.reshape(a, a, g, th, tw, c)
    y = _apply(at, list(m))                              # (m, a, G, th, tw, C)
    y = _apply(at, [y[:, q] for q in range(a)], axis=1)  # (m, m, G, th, tw, C)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(g, th * tile, tw * tile, c)


def _output_transform_t(dy, tile: int):
    """Transpose of `_output_transform`: (G, th*m, tw*m, C) -> (a*a, G*th*tw, C)."""
    a_mat = np.asarray(MATRICES[tile][2]).T  # A: (a, m)
    g, hh, ww, c = dy.shape
    d = dy.reshape(g, hh // tile, tile, ww // tile, tile, c)
    d = _apply(a_mat, [d[:, :, r] for r in range(tile)])                   # (a, G, th, tw, m, C)
    d = _apply(a_mat, [d[:, :, :, :, s] for s in range(tile)], axis=1)     # (a, a, G, th, tw, C)
    return d.reshape((tile + 2) ** 2, -1, c)


def choose_tile(shape, cout: int, dtype=jnp.float32) -> int | None:
    """The "auto" policy: Winograd tile for an NHWC input `shape` and Cout, or None = direct.

    From VGG16 runs (benchmarks/results_library.md): below Cin*Cout = 64*64 (block1)
    the matmul is too thin to pay for the transforms' memory passes; F(4,3) from 32 pixels up;
    F(2,3) below, where F(4,3) pads more (9 -> 12) and its 36 products per tile outweigh the
    saving. Off the CPU (cuDNN, ...) and for narrower dtypes than float32 (which `conv3x3`
    would widen) XLA's own conv is left alone.
    """
    cin = shape[-1]
    if jax.default_backend() != "cpu" or dtype != jnp.float32 or cin * cout <= 64 * 64:
        return None
    return tile_for(shape)


def tile_for(shape) -> int:
    """F(4,3) for NHWC inputs of at least 32x32 pixels, else F(2,3)."""
    return 4 if min(shape[1:3]) >= 32 else 2


def _pad(x, tile: int, halo: int):
    """x zero-padded to whole tiles, plus `halo` pixels all round (1: SAME conv input)."""
    _, h, w, _ = x.shape
    hh, ww = -(-h // tile) * tile, -(-w // tile) * tile
    return jnp.pad(x, ((0, 0), (halo, hh + halo - h), (halo, ww + halo - w), (0, 0)))


def _conv(x, kernel, bias, tile: int):
    n, h, w, _ = x.shape
    th, tw = -(-h // tile), -(-w // tile)
    v = _input_transform(_pad(x, tile, 1), tile, th, tw)
    # The elementwise stage: one (tiles x Cin) @ (Cin x Cout) matmul per tile position.
    m = jnp.einsum("ptc,pcd->ptd", v, transform_kernel(kernel, tile))
    y = _output_transform(m, tile, n, th, tw)[:, :h, :w]
    return y if bias is None else y + bias.astype(y.dtype)


def _kernel_grad(x, dy, tile: int):
    """d(loss)/d(kernel) (3, 3, Cin, Cout) from the input x and the output gradient dy, in the
    Winograd domain: dU = V^T dM per tile position, then dk = G^T dU G."""
    _, h, w, cin = x.shape
    a, cout = tile + 2, dy.shape[-1]
    v = _input_transform(_pad(x, tile, 1), tile, -(-h // tile), -(-w // tile))
    du = jnp.einsum("ptc,ptd->pcd", v, _output_transform_t(_pad(dy, tile, 0), tile))
    g = np.asarray(MATRICES[tile][1])
    gg = jnp.asarray(np.kron(g, g).T, x.dtype)  # (9, a*a)
    dk = jnp.matmul(gg, du.reshape(a * a, -1), precision=lax.Precision.HIGHEST)
    return dk.reshape(3, 3, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_vjp(x, kernel, bias, tile):
    return _conv(x, kernel, bias, tile)


def _conv_fwd(x, kernel, bias, tile):
    return _conv(x, kernel, bias, tile), (x, kernel)


def _conv_bwd(tile, res, dy):
    x, kernel = res
    # A SAME 3x3 stride-1 conv's input gradient is the same conv of dy with the kernel rotated
    # 180 degrees and in/out swapped; its kernel gradient contracts x and dy over every tile.
    # Both stay in the Winograd domain (XLA's filter-gradient conv transposes whole
    # activations first: benchmarks/results_library.md).
    dx = _conv(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), None, tile)
    dk = _kernel_grad(x, dy, tile).astype(kernel.dtype)
    return dx, dk, dy.sum((0, 1, 2)).astype(kernel.dtype)


_conv_vjp.defvjp(_conv_fwd, _conv_bwd)


def conv3x3(x, kernel, bias=None, tile: int = 4):
    """3x3, stride 1, SAME cross-correlation (what `lax.conv` / `nn.Conv` compute) via Winograd.

    x: (N, H, W, Cin) float; kernel: (3, 3, Cin, Cout) HWIO; bias: (Cout,) or None.
    Returns (N, H, W, Cout) in x's dtype, computed in at least float32. Any H, W >= 1: inputs
    are zero-padded up to whole tiles and the output cropped. tile: output tile side m, 2
    (F(2,3)) or 4 (F(4,3)).
    Jits and differentiates; the backward pass is Winograd too (`_conv_bwd`).
    """
    if tile not in MATRICES:
        raise ValueError(f"tile must be one of {TILES}, found {tile!r}")
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv3x3 expects NHWC input and a (3, 3, Cin, Cout) HWIO kernel with "
                         f"matching Cin, found input {tuple(x.shape)}, kernel {tuple(kernel.shape)}")
    if bias is None:
        bias = jnp.zeros((kernel.shape[-1],), x.dtype)
    # The transforms amplify rounding (F(4,3) in bfloat16 is ~10% off): narrower inputs are
    # transformed and multiplied in float32, and only the result is cast back.
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return _conv_vjp(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype), tile).astype(x.dtype)
