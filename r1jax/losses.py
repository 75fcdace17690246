"""Masked cross-entropy, per-token log-probs and masked means (all in float32)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of x where mask is set; 0 where the mask is empty."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32) * mask, 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1e-9)


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[token], [b, t] float32.

    The sampler and the trainer both call this: their log-probs are one function.
    """
    logits = logits_btv.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tokens_bt[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def entropy(logits_btv: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position, [b, t] float32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array,
                  mask_bt: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy over masked positions (targets already aligned)."""
    nll = -token_logprobs(logits_btv, targets_bt)
    if mask_bt is None:
        return jnp.mean(nll)
    return masked_mean(nll, mask_bt)


def next_token_loss(logits_btv: jax.Array, tokens_bt: jax.Array,
                    mask_bt: Optional[jax.Array] = None) -> jax.Array:
    """Cross-entropy of logits at i against token i + 1; `mask` marks the target tokens."""
    mask = None if mask_bt is None else mask_bt[:, 1:]
    return cross_entropy(logits_btv[:, :-1], tokens_bt[:, 1:], mask)
