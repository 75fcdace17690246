"""KV caches as pytrees.

MLA caches only what the weight-absorbed decode path needs: the normalised key/value
latent and the rotated shared RoPE key, `kv_lora_rank + qk_rope_head_dim` values per
token per layer (576 for DeepSeek-V3, against 128 * (192 + 128) = 40,960 for full keys
and values). GQA models cache keys and values per key/value head.

A cache holds one stack per layer group (the dense layers, the MoE layers, the MTP
block), matching the stacked parameters, and `lengths[b]`: how many slots of each row
are valid. `forward` writes new tokens at slots `lengths[b] ...` and advances `lengths`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp

from r1jax.configs import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLACache:
    """latent_rope [l, b, s, kv_lora_rank + qk_rope_head_dim]: normalised latent | rotated k_rope."""

    latent_rope: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GQACache:
    """k [l, b, m, h, s] and v [l, b, m, s, h]: keys (already rotated) with the slot axis
    last, values head-major, the layouts a decode step reads fastest (its scores and
    outputs are then sums of whole rows of slots or of head vectors; on CPU the scores
    with keys [.., s, h] took 3x as long)."""

    k: jax.Array
    v: jax.Array


LayerCache = Union[MLACache, GQACache]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    lengths: jax.Array  # [b] int32
    dense: Optional[LayerCache]  # stacked [l, ...], or a tuple of l per-layer caches
    moe: Optional[LayerCache]
    mtp: Optional[LayerCache]

    @property
    def max_length(self) -> int:
        group = self.dense if self.dense is not None else self.moe
        stacked = not isinstance(group, tuple)
        layer = group if stacked else group[0]
        if isinstance(layer, MLACache):
            return layer.latent_rope.shape[1 + stacked]  # [b, s, w]
        return layer.v.shape[2 + stacked]  # [b, m, s, h]


def cache_logical_axes(cfg: ModelConfig) -> dict:
    """Logical axes of each cache array (for shardings)."""
    if cfg.is_mla:
        return {"latent_rope": ("layers", "batch", "cache_seq", "kv_lora")}
    return {"k": ("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
            "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim")}


def _layer_cache(cfg: ModelConfig, layers: int, batch: int, max_length: int, dtype):
    if layers == 0:
        return None
    if cfg.is_mla:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        return MLACache(jnp.zeros((layers, batch, max_length, width), dtype))
    m, h = cfg.num_kv_heads, cfg.gqa_head_dim
    return GQACache(jnp.zeros((layers, batch, m, h, max_length), dtype),
                    jnp.zeros((layers, batch, m, max_length, h), dtype))


def init_cache(cfg: ModelConfig, batch: int, max_length: int, with_mtp: bool = False,
               dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens each."""
    if max_length < 1:
        raise ValueError(f"init_cache: max_length={max_length}; expected >= 1")
    dtype = dtype or cfg.activation_dtype
    return KVCache(
        lengths=jnp.zeros((batch,), jnp.int32),
        dense=_layer_cache(cfg, cfg.num_dense_layers, batch, max_length, dtype),
        moe=_layer_cache(cfg, cfg.num_moe_layers, batch, max_length, dtype),
        mtp=_layer_cache(cfg, 1 if (with_mtp and cfg.num_nextn_predict_layers) else 0, batch,
                         max_length, dtype),
    )


def split_stack(stack):
    """A pytree stacked along a leading axis [l, ...] -> a tuple of l pytrees; None and
    tuples (already split) pass through."""
    if stack is None or isinstance(stack, tuple):
        return stack
    count = jax.tree.leaves(stack)[0].shape[0]
    return tuple(jax.tree.map(lambda a, i=i: a[i], stack) for i in range(count))


def join_stack(items):
    """The inverse of `split_stack`: a tuple of pytrees -> one stacked along a new axis 0."""
    return jax.tree.map(lambda *a: jnp.stack(a), *items)


def unstack_cache(cache: KVCache) -> KVCache:
    """The cache with its dense and MoE stacks [l, ...] split into tuples of per-layer
    caches, to go with `r1jax.model.transformer.unstack_layers`: a decode step then
    writes each layer's new slot in place instead of rebuilding the stack."""
    return dataclasses.replace(cache, dense=split_stack(cache.dense), moe=split_stack(cache.moe))


def grow_cache(cache: KVCache, max_length: int) -> KVCache:
    """The cache with `max_length` slots per row, the new ones empty (stacked or per-layer
    stacks alike; the slot axis is -2 of MLA latents and GQA values, -1 of GQA keys)."""
    def grow(a, axis):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, max_length - a.shape[axis])
        return jnp.pad(a, pad)

    def group(g):
        if g is None:
            return None
        if isinstance(g, tuple):
            return tuple(group(layer) for layer in g)
        if isinstance(g, MLACache):
            return dataclasses.replace(g, latent_rope=grow(g.latent_rope, -2))
        return dataclasses.replace(g, k=grow(g.k, -1), v=grow(g.v, -2))

    if max_length < cache.max_length:
        raise ValueError(f"grow_cache: max_length={max_length} < the cache's {cache.max_length}")
    return dataclasses.replace(cache, dense=group(cache.dense), moe=group(cache.moe),
                               mtp=group(cache.mtp))


def values_per_token_per_layer(cfg: ModelConfig) -> int:
    """Cached scalars per token per layer: c + r for MLA, 2 * m * h for GQA."""
    if cfg.is_mla:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_kv_heads * cfg.gqa_head_dim


def full_kv_values_per_token_per_layer(cfg: ModelConfig) -> int:
    """What a cache of full per-head keys and values would hold (the comparison for MLA)."""
    if cfg.is_mla:
        return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return values_per_token_per_layer(cfg)


def write_rows(buffer: jax.Array, new: jax.Array, start_b: jax.Array, axis: int = 1) -> jax.Array:
    """Writes `new` into `buffer` along the slot axis `axis` at per-row offsets start [b]:
    buffer [b, s, ...] and new [b, t, ...] with axis 1; [b, m, s, h] and [b, m, t, h] with 2;
    [b, m, h, s] and [b, m, h, t] with 3."""
    def one(buf, new, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=axis - 1)
    return jax.vmap(one)(buffer, new, start_b)
