"""Small building blocks: projections, RMSNorm, SwiGLU, embedding lookup and output head."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutMajor:
    """A projection weight stored output-major, the decode layout of `out_major`:
    `oi` [prod(out_shape), prod(in_shape)] is the weight [*in_shape, *out_shape] flattened
    and transposed."""
    oi: jax.Array
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))


def out_major(w, in_axes: int = 1) -> OutMajor:
    """Weight [*in, *out] (the first `in_axes` axes contracted by `linear`) -> `OutMajor`
    (one transposed copy); an `OutMajor` is returned as it is."""
    if isinstance(w, OutMajor):
        return w
    in_shape, out_shape = w.shape[:in_axes], w.shape[in_axes:]
    return OutMajor(w.reshape(math.prod(in_shape), -1).T, tuple(in_shape), tuple(out_shape))


def in_major(w) -> jax.Array:
    """The inverse of `out_major`: the weight [*in_shape, *out_shape]; an array as it is."""
    if not isinstance(w, OutMajor):
        return w
    return w.oi.T.reshape(*w.in_shape, *w.out_shape)


def linear(x: jax.Array, w, in_axes: int = 1) -> jax.Array:
    """Projection x [..., *w.shape[:in_axes]] -> [..., *w.shape[in_axes:]] as one 2-D matmul.

    Equivalent to an einsum over the leading weight axes, but flattened on purpose: XLA
    on CPU compiles the backward pass of multi-axis and `...` contractions into fused
    loops about 2.7x slower than plain matrix products (measured on a SwiGLU block).

    An `OutMajor` weight (what the sampler decodes with on CPU) runs the product with the
    weight on the left, [out, in] x [in, rows], and transposes the small result: for a
    decode step's few rows XLA:CPU's kernels run that form 1.1-1.5x faster than
    [rows, in] x [in, out].
    """
    if isinstance(w, OutMajor):
        in_shape, out_shape = w.in_shape, w.out_shape
    else:
        in_shape, out_shape = w.shape[:in_axes], w.shape[in_axes:]
    lead = x.shape[:x.ndim - len(in_shape)]
    x2 = x.reshape(-1, math.prod(in_shape))
    if isinstance(w, OutMajor):
        # the barrier keeps XLA from folding the transpose back into the product
        y = jax.lax.optimization_barrier(jnp.dot(w.oi.astype(x.dtype), x2.T)).T
    else:
        y = jnp.dot(x2, w.reshape(math.prod(in_shape), -1).astype(x.dtype))
    return y.reshape(*lead, *out_shape)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2) + eps) * weight`, computed in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def swiglu(x_btd: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    """`down(silu(gate(x)) * up(x))` over the last axis: [..., d] -> [..., d]."""
    return linear(_silu_times(linear(x_btd, gate_df), linear(x_btd, up_df)), down_fd)


@jax.checkpoint
def _silu_times(gate, up):
    # recomputed in the backward pass from its inputs, which the matmuls keep anyway:
    # autodiff would keep sigmoid(gate) and silu(gate) as well (two more [tokens, ffn]
    # arrays per layer, written by the forward pass)
    return jax.nn.silu(gate) * up


def embed(tokens_bt: jax.Array, table_vd: jax.Array, dtype) -> jax.Array:
    """Token embeddings [b, t] -> [b, t, d] (no scaling)."""
    return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)


def unembed(h_btd: jax.Array, lm_head_dv, table_vd: jax.Array) -> jax.Array:
    """Float32 logits [b, t, v]; a tied model (no `lm_head`) uses the embedding table.
    `lm_head_dv`: [d, v], an `OutMajor` of it (the sampler's CPU decode layout), or None."""
    h = h_btd.astype(jnp.float32)
    if lm_head_dv is None:
        b, t, d = h.shape
        return jnp.dot(h.reshape(b * t, d), table_vd.astype(jnp.float32).T).reshape(b, t, -1)
    return linear(h, lm_head_dv)  # in float32: linear casts the weight to h's dtype
