"""A forward pass over groups of rows that share a prefix: the prefix runs once per group.

GRPO's G completions of one prompt all start with the same prompt tokens, so their
hidden states over the prompt are equal. Here the prompt of each group runs once into a
KV cache (the sampler's prefill), the cache is repeated G times, and each row's
completion runs as one cached step of N tokens attending to it. The result equals the
plain forward over the whole rows (same keys, values and positions), the gradient
included: the repeated cache's gradient sums over the group. It saves the prompt's
forward (and backward) G - 1 times per group: with 64-token prompts, G = 8 and 128 new
tokens, 29% of the body FLOPs of a GRPO update and reference pass.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from r1jax.configs import ModelConfig
from r1jax.model import expert_parallel
from r1jax.model.cache import grow_cache, init_cache, unstack_cache
from r1jax.model.moe import balance_loss_from_terms
from r1jax.model.transformer import Params, forward
from r1jax.sharding import MeshRules


def prefix_sharing_applies(cfg: ModelConfig, rows: int, group_size: Optional[int],
                           mesh_rules: Optional[MeshRules] = None) -> bool:
    """Whether `forward_shared_prefix` runs here: groups of more than one row that divide
    the batch, and no expert-parallel dispatch (kept to the one forward pass over whole
    rows that it is tested with)."""
    if not group_size or group_size < 2 or rows % group_size:
        return False
    return not (cfg.num_moe_layers and expert_parallel.enabled(cfg, mesh_rules))


def forward_shared_prefix(params: Params, prefix_tokens_gp: jax.Array, prefix_lengths_g: jax.Array,
                          tokens_nw: jax.Array, cfg: ModelConfig, group_size: int, *,
                          prefix_experts: Optional[jax.Array] = None,
                          experts: Optional[jax.Array] = None,
                          prefix_token_mask: Optional[jax.Array] = None,
                          token_mask: Optional[jax.Array] = None,
                          mesh_rules: Optional[MeshRules] = None):
    """Rows i*G .. i*G+G-1 continue prefix i: (hidden [n, w, d], aux).

    prefix_tokens_gp [g, p] int32, prefix_lengths_g [g] (<= p): group i's prefix is its
    first `prefix_lengths_g[i]` tokens. tokens_nw [n = g*G, w]: each row's tokens after
    its prefix, at positions prefix_length + 0..w-1. hidden[:, j] is the final hidden state
    (before the final norm) that predicts token j of tokens_nw: the prefix's last one for
    j = 0, the row's own token j - 1 after that.
    prefix_experts [l_moe, g, p, k] / experts [l_moe, n, w, k]: routing to replay;
    prefix_token_mask [g, p] / token_mask [n, w]: real tokens, for the MoE loads (the
    prefix's positions past its length are left out either way).
    aux, for models with MoE layers: `expert_load` [l_moe, e] and the sequence-wise
    `balance_loss`, both as the plain forward over the n whole rows gives them (each row's
    statistics over its prefix and its own tokens).
    """
    g, p = prefix_tokens_gp.shape
    n, w = tokens_nw.shape
    if n != g * group_size:
        raise ValueError(f"forward_shared_prefix: {n} rows, expected {g} prefixes x "
                         f"group_size {group_size} = {g * group_size}")
    in_prefix = jnp.arange(p)[None] < prefix_lengths_g[:, None]
    prefix_token_mask = in_prefix if prefix_token_mask is None else prefix_token_mask & in_prefix
    cache = unstack_cache(init_cache(cfg, g, p))
    route = lambda e: None if e is None else {"moe": e}  # noqa: E731
    head = forward(params, prefix_tokens_gp, cfg, cache=cache, routing=route(prefix_experts),
                   with_mtp=False, token_mask=prefix_token_mask, mesh_rules=mesh_rules,
                   return_logits=False)
    rows = lambda a: jnp.repeat(a, group_size, axis=0)  # noqa: E731
    cache = dataclasses.replace(grow_cache(head.cache, p + w), lengths=prefix_lengths_g)
    cache = jax.tree.map(rows, cache)
    tail = forward(params, tokens_nw, cfg, cache=cache, routing=route(experts), with_mtp=False,
                   token_mask=token_mask, mesh_rules=mesh_rules, return_logits=False)
    last_g1d = jnp.take_along_axis(head.aux["final_hidden"], (prefix_lengths_g - 1)[:, None, None],
                                   axis=1)
    hidden = jnp.concatenate([rows(last_g1d), tail.aux["final_hidden"][:, :-1]], axis=1)
    if "expert_load" not in tail.aux:
        return hidden, {}
    balance = jnp.zeros((), jnp.float32)  # without a sequence-wise loss (alpha = 0)
    if tail.aux["balance_terms"] is not None:  # each row's sums: its prefix's + its own
        terms = [jnp.repeat(a, group_size, axis=1) + b
                 for a, b in zip(head.aux["balance_terms"], tail.aux["balance_terms"])]
        balance = balance_loss_from_terms(*terms, cfg).sum()
    return hidden, {"expert_load": head.aux["expert_load"] * group_size + tail.aux["expert_load"],
                    "balance_loss": balance}
