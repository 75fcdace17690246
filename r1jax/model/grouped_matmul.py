"""Grouped matmul over row blocks: the MoE expert products on accelerators.

Rows come in blocks of `block_rows` (m = blocks * block_rows); every row of block i
belongs to expert `block_expert[i]` (-1: an unused block, whose output rows are zero).
MoE dispatch sorts the (token, expert) pairs by expert and pads each expert's rows to a
multiple of the block, so the FLOPs grow with tokens x top-k, never with the expert count
(XLA's `ragged_dot` is lowered densely, over every expert, on GPUs).

    grouped_matmul(x [m, k], w [e, k, n], block_expert [blocks]) -> y [m, n]
        y[rows of block i] = x[rows of block i] @ w[block_expert[i]]
    grouped_matmul_t(x [m, k], dy [m, n], block_expert [blocks], e) -> dw [e, k, n]
        dw[j] = sum over the blocks i of expert j of x[block i]^T @ dy[block i]
        (the blocks of one expert must be contiguous, as the sorted layout makes them)

Implementations (`impl`): 'pallas' (Pallas kernels lowered through Triton: one program
per row block and column tile, a loop over the contraction, float32 accumulation; the GPU
path), 'pallas_interpret' (the same kernels interpreted, to test them on any machine) and
'xla' (batched matmuls over gathered expert weights: the portable reference).
`grouped_matmul` is differentiable: dx = grouped_matmul(dy, w^T), dw = grouped_matmul_t(x, dy).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("pallas", "pallas_interpret", "xla")
TILE_K, TILE_N = 64, 128  # largest contraction / output-column tiles of the kernels
MIN_TILE = 16  # Triton's smallest dot operand


def _tile(size: int, largest: int) -> int:
    """The largest power of two <= `largest` dividing `size`."""
    t = largest
    while t > 1 and size % t:
        t //= 2
    return t


def pallas_supported(block_rows: int, k: int, n: int) -> bool:
    """Whether the Pallas kernels take these shapes (both products of the backward pass
    included): power-of-two row blocks and contraction / column tiles of at least 16."""
    pow2 = block_rows & (block_rows - 1) == 0
    return (pow2 and block_rows >= MIN_TILE and _tile(k, TILE_K) >= MIN_TILE
            and _tile(n, TILE_K) >= MIN_TILE)


def _check(x, block_expert, what: str):
    """Rows per block; x's rows must split evenly into block_expert's blocks."""
    m = x.shape[0]
    blocks = block_expert.shape[0]
    if m % blocks:
        raise ValueError(f"{what}: x has {m} rows, not a multiple of the {blocks} blocks "
                         "of block_expert")
    return m // blocks


# Pallas kernels ----------------------------------------------------------------------------------

def _gmm_kernel(expert_ref, x_ref, w_ref, y_ref, *, tile_k: int):
    """Program (i, j): rows of block i times columns tile j of w[block_expert[i]].
    x_ref: the block's rows [block_rows, k]; w_ref: w as [e * k, tile_n]."""
    from jax.experimental import pallas as pl

    expert = expert_ref[pl.program_id(0)]
    k = x_ref.shape[1]
    first_row = jnp.maximum(expert, 0) * k

    def step(s, acc):
        x = x_ref[:, pl.ds(s * tile_k, tile_k)]
        w = w_ref[pl.ds(first_row + s * tile_k, tile_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    # unused block: zeros, no work (arithmetic, not jnp.where: Pallas's Triton lowering
    # turned a select of two integer literals into booleans)
    steps = (expert >= 0).astype(jnp.int32) * (k // tile_k)
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(y_ref.shape, jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _tgmm_kernel(first_ref, count_ref, x_ref, dy_ref, dw_ref, *, block_rows: int):
    """Program (j, a, b): dw[j] tile (a, b) = sum over expert j's blocks of x^T dy.
    x_ref: all rows, columns tile a [m, tile_k]; dy_ref: all rows, columns tile b."""
    from jax.experimental import pallas as pl

    j = pl.program_id(0)
    first = first_ref[j]

    def step(s, acc):
        rows = pl.ds((first + s) * block_rows, block_rows)
        x, dy = x_ref[rows, :], dy_ref[rows, :]
        return acc + jnp.dot(x.T, dy, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, count_ref[j], step, jnp.zeros(dw_ref.shape, jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams(num_warps=4, num_stages=3)


def _gmm_pallas(x, w, block_expert, interpret: bool):
    from jax.experimental import pallas as pl

    (m, k), (e, _, n) = x.shape, w.shape
    block_rows = _check(x, block_expert, "grouped_matmul")
    tile_n = _tile(n, TILE_N)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tile_k=_tile(k, TILE_K)),
        grid=(block_expert.shape[0], n // tile_n),
        in_specs=[pl.no_block_spec,
                  pl.BlockSpec((block_rows, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((e * k, tile_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_rows, tile_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=_compiler_params(interpret),
        interpret=interpret,
        name="r1jax_grouped_matmul",
    )(block_expert, x, w.reshape(e * k, n))


def _tgmm_pallas(x, dy, block_expert, e: int, out_dtype, interpret: bool):
    from jax.experimental import pallas as pl

    (m, k), n = x.shape, dy.shape[1]
    block_rows = _check(x, block_expert, "grouped_matmul_t")
    owner = jnp.where(block_expert >= 0, block_expert, e)  # unused blocks counted apart
    count = jnp.zeros((e + 1,), jnp.int32).at[owner].add(1)[:e]
    first = jnp.cumsum(count) - count
    tile_k, tile_n = _tile(k, TILE_K), _tile(n, TILE_K)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, block_rows=block_rows),
        grid=(e, k // tile_k, n // tile_n),
        in_specs=[pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((m, tile_k), lambda j, a, b: (0, a)),
                  pl.BlockSpec((m, tile_n), lambda j, a, b: (0, b))],
        out_specs=pl.BlockSpec((None, tile_k, tile_n), lambda j, a, b: (j, a, b)),
        out_shape=jax.ShapeDtypeStruct((e, k, n), out_dtype),
        compiler_params=_compiler_params(interpret),
        interpret=interpret,
        name="r1jax_grouped_matmul_t",
    )(first.astype(jnp.int32), count, x, dy)


# The portable reference --------------------------------------------------------------------------

def _gmm_xla(x, w, block_expert):
    block_rows = _check(x, block_expert, "grouped_matmul")
    blocks = block_expert.shape[0]
    w_bkn = w[jnp.maximum(block_expert, 0)].astype(x.dtype)
    y = jnp.einsum("bsk,bkn->bsn", x.reshape(blocks, block_rows, -1), w_bkn,
                   preferred_element_type=jnp.float32)
    y = jnp.where((block_expert >= 0)[:, None, None], y, 0)
    return y.reshape(x.shape[0], -1).astype(x.dtype)


def _tgmm_xla(x, dy, block_expert, e: int, out_dtype):
    block_rows = _check(x, block_expert, "grouped_matmul_t")
    blocks = block_expert.shape[0]
    per_block = jnp.einsum("bsk,bsn->bkn", x.reshape(blocks, block_rows, -1),
                           dy.reshape(blocks, block_rows, -1), preferred_element_type=jnp.float32)
    owner = jnp.where(block_expert >= 0, block_expert, e)
    return jax.ops.segment_sum(per_block, owner, num_segments=e + 1)[:e].astype(out_dtype)


# Public functions --------------------------------------------------------------------------------

def grouped_matmul_t(x: jax.Array, dy: jax.Array, block_expert: jax.Array, e: int,
                     impl: str = "xla", out_dtype=None) -> jax.Array:
    """dw [e, k, n] of `grouped_matmul`: per expert, the sum of x_block^T dy_block."""
    out_dtype = out_dtype or x.dtype
    if impl == "xla":
        return _tgmm_xla(x, dy, block_expert, e, out_dtype)
    return _tgmm_pallas(x, dy, block_expert, e, out_dtype, impl == "pallas_interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array,
                   impl: str = "xla") -> jax.Array:
    """y [m, n]: each block of rows of x [m, k] times its expert's w [e, k, n] (module doc).

    block_expert: int32 [blocks], -1 for unused blocks; impl: one of `IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r}: expected one of {IMPLS}")
    if impl == "xla":
        return _gmm_xla(x, w, block_expert)
    return _gmm_pallas(x, w.astype(x.dtype), block_expert, impl == "pallas_interpret")


def _grouped_matmul_fwd(x, w, block_expert, impl):
    return grouped_matmul(x, w, block_expert, impl), (x, w, block_expert)


def _grouped_matmul_bwd(impl, res, dy):
    x, w, block_expert = res
    dy = dy.astype(x.dtype)
    dx = grouped_matmul(dy, jnp.swapaxes(w, 1, 2), block_expert, impl)
    dw = grouped_matmul_t(x, dy, block_expert, w.shape[0], impl, out_dtype=w.dtype)
    return dx, dw, np.zeros(block_expert.shape, jax.dtypes.float0)


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
