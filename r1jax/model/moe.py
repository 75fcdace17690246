"""DeepSeekMoE: routing, dropless expert dispatch, shared experts, load balancing.

Routing (float32): scores are sigmoid (V3) or softmax (V2) of `x @ router`. With
`noaux_tc`, experts are *chosen* on `scores + router_bias` (the auxiliary-loss-free
correction bias) inside the `topk_group` best groups, while the gate weights use the
unbiased scores of the chosen experts, renormalised, times `routed_scaling_factor`.

Dispatch is dropless and its compute grows with tokens x top-k, not tokens x experts:
the (token, expert) pairs are sorted by expert and padded per expert to a multiple of a
block of rows; a loop over the occupied blocks multiplies each by its expert's weights
(`moe_matmul='blocks'`). `moe_matmul='ragged_dot'` uses `jax.lax.ragged_dot` instead,
which is a grouped matmul on TPU but is lowered densely (all experts) on CPU and GPU.
Weights split into per-expert tuples (`transformer.unstack_layers(..., experts=True)`, the
sampler's decode layout on CPU) run `expert_ffn_unrolled` for a few tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from r1jax.configs import ModelConfig
from r1jax.model.layers import swiglu
from r1jax.sharding import ArrayInfo, fan_in_init, normal_init, zeros_init


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLPWeights:
    gate: jax.Array  # [d, f]
    up: jax.Array  # [d, f]
    down: jax.Array  # [f, d]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEWeights:
    router: jax.Array  # [d, e]
    router_bias: jax.Array  # [e] float32, the auxiliary-loss-free correction bias
    gate: jax.Array  # [e, d, f]
    up: jax.Array  # [e, d, f]
    down: jax.Array  # [e, f, d]
    shared: Optional[MLPWeights]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    load: jax.Array  # [e] int32: tokens routed to each expert
    balance_loss: jax.Array  # [] float32: sequence-wise balance loss, already times alpha
    experts: jax.Array  # [b, t, k] int32: the experts chosen per token (for routing replay)
    weights: jax.Array  # [b, t, k] float32: the gate weight of each chosen expert


def mlp_infos(cfg: ModelConfig, hidden: int) -> MLPWeights:
    d, dt = cfg.hidden_size, cfg.weight_dtype
    return MLPWeights(
        gate=ArrayInfo((d, hidden), dt, ("embed", "mlp"), fan_in_init(d)),
        up=ArrayInfo((d, hidden), dt, ("embed", "mlp"), fan_in_init(d)),
        down=ArrayInfo((hidden, d), dt, ("mlp", "embed"), fan_in_init(hidden)),
    )


def moe_infos(cfg: ModelConfig) -> MoEWeights:
    d, e, f, dt = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.weight_dtype
    shared = mlp_infos(cfg, f * cfg.n_shared_experts) if cfg.n_shared_experts else None
    return MoEWeights(
        router=ArrayInfo((d, e), dt, ("embed", None), normal_init(d ** -0.5)),
        router_bias=ArrayInfo((e,), jnp.float32, (None,), zeros_init),
        gate=ArrayInfo((e, d, f), dt, ("experts", "embed", "expert_mlp"), fan_in_init(d)),
        up=ArrayInfo((e, d, f), dt, ("experts", "embed", "expert_mlp"), fan_in_init(d)),
        down=ArrayInfo((e, f, d), dt, ("experts", "expert_mlp", "embed"), fan_in_init(f)),
        shared=shared,
    )


# Routing -------------------------------------------------------------------------------------

def router_scores(x_nd: jax.Array, router_de: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Per-expert affinities [n, e] in float32 (sigmoid or softmax of the router logits)."""
    logits = jnp.einsum("nd,de->ne", x_nd.astype(jnp.float32), router_de.astype(jnp.float32))
    return jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)


def select_experts(scores_ne: jax.Array, bias_e: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Top-k expert ids [n, k], chosen on the biased scores inside the best groups."""
    choice = scores_ne + bias_e if cfg.topk_method == "noaux_tc" else scores_ne
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        n = choice.shape[0]
        grouped = choice.reshape(n, cfg.n_group, cfg.experts_per_group)
        if cfg.topk_method == "noaux_tc":  # a group's score: the sum of its two best experts
            group_score = jax.lax.top_k(grouped, min(2, cfg.experts_per_group))[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        _, keep_groups = jax.lax.top_k(group_score, cfg.topk_group)
        keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep_groups].set(True)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, -1)
    return jax.lax.top_k(choice, cfg.num_experts_per_tok)[1].astype(jnp.int32)


def gate_weights(scores_ne: jax.Array, experts_nk: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Weights [n, k] of the chosen experts: unbiased scores, renormalised, scaled."""
    weights = jnp.take_along_axis(scores_ne, experts_nk, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route(x_nd: jax.Array, w: MoEWeights, cfg: ModelConfig, experts_nk: Optional[jax.Array] = None):
    """(experts [n, k] int32, weights [n, k] float32, scores [n, e] float32).

    Passing `experts_nk` replays a recorded routing (entries of -1 are routed afresh): the
    weights are recomputed from the current scores at those experts, so gradients still
    flow into the router.
    """
    scores = router_scores(x_nd, w.router, cfg)
    fresh = select_experts(scores, w.router_bias, cfg)
    experts_nk = fresh if experts_nk is None else jnp.where(experts_nk >= 0, experts_nk, fresh)
    return experts_nk, gate_weights(scores, experts_nk, cfg), scores


# Balancing -----------------------------------------------------------------------------------

def sequence_balance_loss(scores_bte: jax.Array, experts_btk: jax.Array, cfg: ModelConfig,
                          mask_bt: Optional[jax.Array] = None) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i * P_i, averaged over rows.

    f_i = E / (K * T) * (tokens of the row routed to i), P_i = mean over the row's tokens
    of the normalised affinity s_i / sum_j s_j.
    """
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if mask_bt is None:
        mask_bt = jnp.ones(experts_btk.shape[:2], jnp.float32)
    tokens = jnp.maximum(mask_bt.sum(-1), 1.0)  # [b]
    counts = (jax.nn.one_hot(experts_btk, e, dtype=jnp.float32).sum(2) * mask_bt[..., None]).sum(1)
    f = counts * e / (k * tokens[:, None])
    normed = scores_bte / (scores_bte.sum(-1, keepdims=True) + 1e-20)
    p = (normed * mask_bt[..., None]).sum(1) / tokens[:, None]
    return cfg.aux_loss_alpha * jnp.mean(jnp.sum(f * p, axis=-1))


def update_router_bias(bias_le: jax.Array, load_le: jax.Array, gamma: float) -> jax.Array:
    """Auxiliary-loss-free balancing: b_i += gamma * sign(mean_load - load_i), per layer."""
    load = load_le.astype(jnp.float32)
    return bias_le + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)


# Dispatch ------------------------------------------------------------------------------------

def block_size(rows: int, experts: int) -> int:
    """Rows per block: about half the mean rows per expert, a power of two in [8, 256]."""
    target = max(rows // (2 * experts), 1)
    return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def _sorted_pairs(experts_nk: jax.Array, num_experts: int):
    flat = experts_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return flat, order, sizes


def expert_ffn_blocks(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, block: int,
                      remat: bool = False):
    """Sorted, block-padded grouped SwiGLU: compute is (n*k + experts*block) rows at most,
    and only the occupied blocks run. Pairs whose expert id is outside [0, e) are skipped
    (no compute, zero output): expert parallelism marks pairs owned elsewhere that way.

    remat: keep only each block's gate and up products for the backward pass. Without it
    the loop also saves each block's slice of the expert weights, [blocks, d, f] per matrix
    (62 GB per device for DeepSeek-V3 at 4k tokens per device)."""
    n, k = experts_nk.shape
    e, d, _ = gate_edf.shape
    dt = x_nd.dtype
    rows = n * k
    skip = jnp.where((experts_nk >= 0) & (experts_nk < e), experts_nk, e)  # sorts last
    flat, order, sizes = _sorted_pairs(skip, e)  # bincount(length=e) leaves out id e
    padded = (sizes + block - 1) // block * block
    padded_start = jnp.cumsum(padded) - padded
    start = jnp.cumsum(sizes) - sizes
    sorted_expert = flat[order]
    dest = padded_start[sorted_expert] + jnp.arange(rows) - start[sorted_expert]  # row in padded layout
    num_blocks = -(-rows // block) + min(e, rows)  # static bound on occupied blocks
    dest = jnp.where(sorted_expert < e, dest, num_blocks * block)  # skipped pairs: out of range
    token = order // k
    x_pad = jnp.zeros((num_blocks * block, d), dt).at[dest].set(x_nd[token], mode="drop")
    block_start = jnp.arange(num_blocks) * block
    block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"), e - 1)
    occupied = block_start < padded.sum()

    def one_block(args):
        x_bd, expert, used = args

        def compute():
            g = jnp.einsum("bd,df->bf", x_bd, gate_edf[expert].astype(dt))
            u = jnp.einsum("bd,df->bf", x_bd, up_edf[expert].astype(dt))
            g, u = checkpoint_name(g, "moe_gate"), checkpoint_name(u, "moe_up")
            return jnp.einsum("bf,fd->bd", jax.nn.silu(g) * u, down_efd[expert].astype(dt))

        return jax.lax.cond(used, compute, lambda: jnp.zeros_like(x_bd))

    if remat:
        keep = jax.checkpoint_policies.save_only_these_names("moe_gate", "moe_up")
        one_block = jax.checkpoint(one_block, policy=keep)
    y_pad = jax.lax.map(one_block, (x_pad.reshape(num_blocks, block, d), block_expert, occupied))
    y_sorted = (y_pad.reshape(-1, d).at[dest].get(mode="fill", fill_value=0)
                * weights_nk.reshape(-1)[order][:, None].astype(dt))
    return jnp.zeros((n, d), dt).at[token].add(y_sorted), sizes


def expert_ffn_ragged(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd):
    """The same grouped SwiGLU through `jax.lax.ragged_dot`."""
    n, k = experts_nk.shape
    dt = x_nd.dtype
    flat, order, sizes = _sorted_pairs(experts_nk, gate_edf.shape[0])
    token = order // k
    xs = x_nd[token]
    g = jax.lax.ragged_dot(xs, gate_edf.astype(dt), sizes)
    u = jax.lax.ragged_dot(xs, up_edf.astype(dt), sizes)
    y = jax.lax.ragged_dot(jax.nn.silu(g) * u, down_efd.astype(dt), sizes)
    y = y * weights_nk.reshape(-1)[order][:, None].astype(dt)
    return jnp.zeros((n, x_nd.shape[1]), dt).at[token].add(y), sizes


UNROLLED_MAX_TOKENS = 64  # above this, per-expert weights are stacked again for `blocks`


def expert_ffn_unrolled(x_nd, experts_nk, weights_nk, gate_e, up_e, down_e):
    """SwiGLU of every expert over all n tokens, each weighted by the token's gate weight
    for that expert (0 where not chosen); gate_e, up_e, down_e are tuples of per-expert
    matrices. e / k times the FLOPs of the grouped matmul, but no sorting, padding, loop
    or copies of expert weights out of a stack: for a decode step's few tokens, whose
    matmuls are bound by reading the weights, about 1.6x faster than `blocks` on CPU."""
    n, d = x_nd.shape
    e = len(gate_e)
    combine_ne = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_nk].add(weights_nk)
    y = jnp.zeros((n, d), jnp.float32)
    for j in range(e):
        y = y + swiglu(x_nd, gate_e[j], up_e[j], down_e[j]).astype(jnp.float32) * combine_ne[:, j:j + 1]
    load = jnp.bincount(experts_nk.reshape(-1), length=e).astype(jnp.int32)
    return y.astype(x_nd.dtype), load


def moe(w: MoEWeights, x_btd: jax.Array, cfg: ModelConfig,
        experts_btk: Optional[jax.Array] = None, mesh_rules=None,
        token_mask_bt: Optional[jax.Array] = None) -> tuple[jax.Array, MoEStats]:
    """Routed experts + shared experts: [b, t, d] -> ([b, t, d], MoEStats).

    With a `mesh_rules` whose rules place `experts` on mesh axes of total size > 1, the
    routed experts run expert-parallel (`r1jax.model.expert_parallel`, always with the
    block dispatch, whatever `moe_matmul` says); routing and the shared experts stay in
    the sharded-jit world either way. `token_mask_bt` marks real tokens: padding is left
    out of the expert loads and the balance loss."""
    from r1jax.model import expert_parallel  # imports this module

    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    replay = None if experts_btk is None else experts_btk.reshape(b * t, -1)
    experts, weights, scores = route(x_nd, w, cfg, replay)
    if isinstance(w.gate, tuple):
        if b * t <= UNROLLED_MAX_TOKENS:
            y, load = expert_ffn_unrolled(x_nd, experts, weights, w.gate, w.up, w.down)
            return _finish(y, load, w, x_nd, experts, weights, scores, cfg, b, t, token_mask_bt)
        w = dataclasses.replace(w, gate=jnp.stack(w.gate), up=jnp.stack(w.up), down=jnp.stack(w.down))
    if expert_parallel.enabled(cfg, mesh_rules):
        y = expert_parallel.routed_experts(x_nd, experts, weights, w, cfg, mesh_rules)
        load = jnp.bincount(experts.reshape(-1), length=cfg.n_routed_experts).astype(jnp.int32)
    elif cfg.moe_matmul == "ragged_dot":
        y, load = expert_ffn_ragged(x_nd, experts, weights, w.gate, w.up, w.down)
    else:
        blk = cfg.moe_block_size or block_size(b * t * cfg.num_experts_per_tok, cfg.n_routed_experts)
        y, load = expert_ffn_blocks(x_nd, experts, weights, w.gate, w.up, w.down, blk, cfg.remat)
    return _finish(y, load, w, x_nd, experts, weights, scores, cfg, b, t, token_mask_bt)


def _finish(y, load, w, x_nd, experts, weights, scores, cfg, b, t, token_mask_bt):
    """Shared experts, loads over real tokens, balance loss; -> ([b, t, d], MoEStats)."""
    d = x_nd.shape[1]
    if w.shared is not None:
        y = y + swiglu(x_nd, w.shared.gate, w.shared.up, w.shared.down)
    experts_btk = experts.reshape(b, t, -1)
    mask = None
    if token_mask_bt is not None:
        mask = token_mask_bt.astype(jnp.float32)
        counted = jnp.repeat(mask.reshape(-1), cfg.num_experts_per_tok)
        load = jnp.bincount(experts.reshape(-1), weights=counted, length=cfg.n_routed_experts)
        load = load.astype(jnp.int32)
    balance = (sequence_balance_loss(scores.reshape(b, t, -1), experts_btk, cfg, mask)
               if cfg.aux_loss_alpha else jnp.zeros((), jnp.float32))
    return y.reshape(b, t, d), MoEStats(load, balance, experts_btk, weights.reshape(b, t, -1))
