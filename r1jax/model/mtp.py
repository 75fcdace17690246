"""Multi-token prediction (DeepSeek-V3, one extra depth).

For position i the module combines the main model's final hidden state h_i with the
embedding of token i+1, `eh_proj([RMSNorm_e(emb(t_{i+1})); RMSNorm_h(h_i)])`, runs one
transformer block, a final norm and the shared output head: its logits at position i
predict token i+2. The embedding and head are shared with the main model. The
concatenation order (embedding first) is the one of the released V3/R1 checkpoints'
`eh_proj` weight; the paper writes the two halves the other way round.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from r1jax.configs import ModelConfig
from r1jax.losses import cross_entropy
from r1jax.model.layers import embed, linear, rms_norm, unembed
from r1jax.sharding import ArrayInfo, fan_in_init, ones_init


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MTPWeights:
    enorm: jax.Array  # [d]
    hnorm: jax.Array  # [d]
    eh_proj: jax.Array  # [2d, d]
    block: "object"  # BlockWeights (one layer, unstacked)
    norm: jax.Array  # [d]


def mtp_infos(cfg: ModelConfig, block_infos) -> MTPWeights:
    d, dt = cfg.hidden_size, cfg.weight_dtype
    return MTPWeights(
        enorm=ArrayInfo((d,), dt, ("embed",), ones_init),
        hnorm=ArrayInfo((d,), dt, ("embed",), ones_init),
        eh_proj=ArrayInfo((2 * d, d), dt, (None, "embed"), fan_in_init(2 * d)),
        block=block_infos,
        norm=ArrayInfo((d,), dt, ("embed",), ones_init),
    )


def mtp_forward(w: MTPWeights, params, h_btd, next_tokens_bt, cos, sin, mask_bts,
                cfg: ModelConfig, block_fn, cache=None, start_b=None,
                experts_btk: Optional[jax.Array] = None, mesh_rules=None):
    """(logits [b, t, v] float32, hidden [b, t, d], new cache, MoEStats or None).

    `h_btd` is the main model's last hidden state (before its final norm); `next_tokens_bt`
    holds token i+1 at position i. `block_fn` is the transformer's block function.
    """
    e = rms_norm(embed(next_tokens_bt, params.embed, h_btd.dtype), w.enorm, cfg.rms_norm_eps)
    hn = rms_norm(h_btd, w.hnorm, cfg.rms_norm_eps)
    x = linear(jnp.concatenate([e, hn], axis=-1), w.eh_proj)
    if cache is not None:  # the MTP cache is stacked like the layer caches, with one layer
        cache = jax.tree.map(lambda a: a[0], cache)
    h, cache, stats = block_fn(w.block, x, cos, sin, mask_bts, cfg, cache, start_b, experts_btk,
                               mesh_rules)
    if cache is not None:
        cache = jax.tree.map(lambda a: a[None], cache)
    logits = unembed(rms_norm(h, w.norm, cfg.rms_norm_eps), params.lm_head, params.embed)
    return logits, h, cache, stats


def mtp_loss(mtp_logits_btv: jax.Array, tokens_bt: jax.Array,
             mask_bt: Optional[jax.Array] = None) -> jax.Array:
    """Mean cross-entropy of the MTP logits at i against token i + 2 (masked)."""
    targets = tokens_bt[:, 2:]
    weights = jnp.ones_like(targets, jnp.float32) if mask_bt is None else mask_bt[:, 2:].astype(jnp.float32)
    return cross_entropy(mtp_logits_btv[:, :-2], targets, weights)
