"""Small building blocks: RMSNorm, SwiGLU, embedding lookup and output head."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2) + eps) * weight`, computed in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def swiglu(x_btd: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    """`down(silu(gate(x)) * up(x))` over the last axis: [..., d] -> [..., d]."""
    dtype = x_btd.dtype
    gate = jnp.einsum("...d,df->...f", x_btd, gate_df.astype(dtype))
    up = jnp.einsum("...d,df->...f", x_btd, up_df.astype(dtype))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, down_fd.astype(dtype))


def embed(tokens_bt: jax.Array, table_vd: jax.Array, dtype) -> jax.Array:
    """Token embeddings [b, t] -> [b, t, d] (no scaling)."""
    return jnp.take(table_vd, tokens_bt, axis=0).astype(dtype)


def unembed(h_btd: jax.Array, lm_head_dv: Optional[jax.Array], table_vd: jax.Array) -> jax.Array:
    """Float32 logits [b, t, v]; a tied model (no `lm_head`) uses the embedding table."""
    h = h_btd.astype(jnp.float32)
    if lm_head_dv is None:
        return jnp.einsum("btd,vd->btv", h, table_vd.astype(jnp.float32))
    return jnp.einsum("btd,dv->btv", h, lm_head_dv.astype(jnp.float32))
