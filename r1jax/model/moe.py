"""DeepSeekMoE: routing, dropless expert dispatch, shared experts, load balancing.

Routing (float32): scores are sigmoid (V3) or softmax (V2) of `x @ router`. With
`noaux_tc`, experts are *chosen* on `scores + router_bias` (the auxiliary-loss-free
correction bias) inside the `topk_group` best groups, while the gate weights use the
unbiased scores of the chosen experts, renormalised, times `routed_scaling_factor`.

Dispatch is dropless and its compute grows with tokens x top-k, not tokens x experts:
the (token, expert) pairs are sorted by expert and padded per expert to a multiple of a
block of rows; a loop over the occupied blocks multiplies each by its expert's weights
(`moe_matmul='blocks'`, the CPU choice). `moe_matmul='grouped'` (the GPU choice) runs the
same sorted, block-padded layout as three grouped matmuls over all blocks at once
(`r1jax.model.grouped_matmul`: Pallas kernels through Triton on GPU, batched XLA matmuls
elsewhere). `moe_matmul='ragged_dot'` uses `jax.lax.ragged_dot` (the TPU choice: a grouped
matmul there, lowered densely over all experts on CPU and GPU). 'auto' picks by backend.
Experts laid side by side (`WideExperts`, from `transformer.unstack_layers(...,
experts=True)`, the sampler's decode layout on CPU) run `expert_ffn_wide` for a few tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import core
from jax.extend import core as jax_core
from jax.interpreters import ad, batching, mlir

from r1jax.configs import ModelConfig
from r1jax.model import grouped_matmul as gmm
from r1jax.model.layers import in_major, linear, swiglu
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
    balance_terms: Optional[tuple] = None  # `balance_terms` ([b, e], [b, e], [b]) when alpha > 0


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

def balance_terms(scores_bte: jax.Array, experts_btk: jax.Array, cfg: ModelConfig,
                  mask_bt: Optional[jax.Array] = None):
    """The per-row sums the sequence-wise balance loss is made of: (tokens routed to each
    expert [b, e], normalised affinities s_i / sum_j s_j summed over tokens [b, e], tokens
    [b]), over the tokens of `mask_bt`. Sums of parts of a row add up to the row's."""
    e = cfg.n_routed_experts
    if mask_bt is None:
        mask_bt = jnp.ones(experts_btk.shape[:2], jnp.float32)
    counts = (jax.nn.one_hot(experts_btk, e, dtype=jnp.float32).sum(2) * mask_bt[..., None]).sum(1)
    normed = scores_bte / (scores_bte.sum(-1, keepdims=True) + 1e-20)
    return counts, (normed * mask_bt[..., None]).sum(1), mask_bt.sum(-1)


def balance_loss_from_terms(counts_be: jax.Array, affinity_be: jax.Array, tokens_b: jax.Array,
                            cfg: ModelConfig) -> jax.Array:
    """alpha * sum_i f_i * P_i averaged over rows, from `balance_terms` (leading axes, e.g.
    layers, stay)."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    tokens = jnp.maximum(tokens_b, 1.0)[..., None]
    f, p = counts_be * e / (k * tokens), affinity_be / tokens
    return cfg.aux_loss_alpha * jnp.mean(jnp.sum(f * p, axis=-1), axis=-1)


def sequence_balance_loss(scores_bte: jax.Array, experts_btk: jax.Array, cfg: ModelConfig,
                          mask_bt: Optional[jax.Array] = None) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i * P_i, averaged over rows.

    f_i = E / (K * T) * (tokens of the row routed to i), P_i = mean over the row's tokens
    of the normalised affinity s_i / sum_j s_j.
    """
    return balance_loss_from_terms(*balance_terms(scores_bte, experts_btk, cfg, mask_bt), cfg)


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


BLOCK_LEVELS = 3  # block sizes 2 * block, block, block / 2, block / 4 (see _block_plan)


def _block_plan(block: int, levels: int) -> tuple[int, ...]:
    """Static block sizes, largest first: each expert's rows fill full blocks of the largest
    size, what is left (padded to the smallest) at most one block of each smaller size.
    2 * block halved `levels` times when that stays >= 8 rows, else block halved while it
    does (at most `levels` times); levels=0: (block,)."""
    top = 2 * block if levels and (2 * block) >> levels >= 8 else block
    sizes = [top]
    while len(sizes) <= levels and sizes[-1] // 2 >= 8 and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return tuple(sizes)


def _block_layout(experts_nk, e: int, plan: tuple[int, ...]):
    """(sizes [e], and per block size s of `plan`: (block_expert [nb], occupied [nb],
    pad_pair [nb, s])): the pair (index into experts_nk.reshape(-1)) on each row of each
    block, n*k where the row is padding. Blocks hold one expert's rows, in sorted order."""
    n, k = experts_nk.shape
    rows = n * k
    skip = jnp.where((experts_nk >= 0) & (experts_nk < e), experts_nk, e)  # sorts last
    _, order, sizes = _sorted_pairs(skip, e)  # bincount(length=e) leaves out id e
    start = jnp.cumsum(sizes) - sizes
    big, small = plan[0], plan[-1]
    chunks = (sizes + small - 1) // small  # rows per expert in units of the smallest block
    per_big = big // small
    counts = [chunks // per_big]  # full blocks of the largest size ...
    rest = chunks % per_big  # ... then one block per set bit of the remainder
    for s in plan[1:]:
        counts.append((rest // (s // small)) % 2)
    offset = jnp.zeros_like(sizes)
    levels = []
    for i, (s, count) in enumerate(zip(plan, counts)):
        # full blocks: sum of ceil(size / small) // (big / small); tails: one per expert
        bound = (rows + e * (small - 1)) // s if i == 0 else min(e, rows)
        bound = max(bound, 1)
        end = jnp.cumsum(count)
        b = jnp.arange(bound)
        expert = jnp.minimum(jnp.searchsorted(end, b, side="right"), e - 1).astype(jnp.int32)
        occupied = b < end[-1]
        row = offset[expert] + (b - (end - count)[expert]) * s  # first row within the expert
        idx = row[:, None] + jnp.arange(s)[None, :]
        valid = occupied[:, None] & (idx < sizes[expert][:, None])
        pair = order[jnp.clip(start[expert][:, None] + idx, 0, rows - 1)]
        levels.append((expert, occupied, jnp.where(valid, pair, rows).astype(jnp.int32)))
        offset = offset + count * s
    return sizes, tuple(levels)


def _silu_and_grad(g):
    s = jax.nn.sigmoid(g)
    return g * s, s * (1 + g * (1 - s))


@jax.custom_jvp
def _grouped_swiglu(layout, x_nd, w_pairs, gate_edf, up_edf, down_efd):
    """sum over pairs (token, expert) of w_pair * SwiGLU_expert(x_token), by blocks."""
    return _forward(layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, False)[0]


@_grouped_swiglu.defjvp
def _grouped_swiglu_jvp(primals, tangents):
    """The primal by `_forward` over the occupied blocks only (a dynamic trip count: no
    cond per block), keeping every block's gate and up products; the tangent through
    `_swiglu_lin_p`, whose transpose (reverse mode) is `_grouped_swiglu_bwd`."""
    layout, x_nd, w_pairs, gate_edf, up_edf, down_efd = primals
    y, saved = _forward(layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, True)
    leaves, tree = jax.tree.flatten((layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, saved))
    return y, _swiglu_lin_p.bind(*leaves, *tangents[1:], res_tree=tree)


def _swiglu_lin(*args, res_tree):
    """The tangent map (linear in the last 5 arguments), by forward-mode autodiff."""
    layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, _ = jax.tree.unflatten(res_tree, args[:-5])
    fn = lambda *a: _forward(layout, *a, False)[0]
    return jax.jvp(fn, (x_nd, w_pairs, gate_edf, up_edf, down_efd), tuple(args[-5:]))[1]


def _swiglu_lin_transpose(ct, *args, res_tree):
    res = jax.tree.unflatten(res_tree, args[:-5])
    if type(ct) is ad.Zero:
        ct = jnp.zeros(ct.aval.shape, ct.aval.dtype)
    cts = _grouped_swiglu_bwd(res, ct)
    return [None] * (len(args) - 5) + [c if isinstance(a, ad.UndefinedPrimal) else None
                                       for a, c in zip(args[-5:], cts)]


def _swiglu_lin_batch(args, dims, res_tree):
    args = [a if dim is None else jnp.moveaxis(a, dim, 0) for a, dim in zip(args, dims)]
    axes = [None if dim is None else 0 for dim in dims]
    return jax.vmap(functools.partial(_swiglu_lin, res_tree=res_tree), in_axes=axes)(*args), 0


# A primitive so that reverse mode transposes the tangent map with the block loops of
# `_grouped_swiglu_bwd` (autodiff's own transpose of a loop over blocks adds a full
# [e, d, f] cotangent per block); forward mode and vmap evaluate it as written.
_swiglu_lin_p = jax_core.Primitive("moe_grouped_swiglu_lin")
_swiglu_lin_p.def_impl(_swiglu_lin)
_swiglu_lin_p.def_abstract_eval(
    lambda *args, res_tree: core.ShapedArray(args[-5].shape, args[-5].dtype))
mlir.register_lowering(_swiglu_lin_p, mlir.lower_fun(_swiglu_lin, multiple_results=False))
ad.primitive_transposes[_swiglu_lin_p] = _swiglu_lin_transpose
batching.primitive_batchers[_swiglu_lin_p] = _swiglu_lin_batch


def _forward(layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, dynamic: bool):
    """(y [n, d], per block size: (gate, up) products [blocks, s, f]). dynamic: a
    fori_loop over the occupied blocks; else a scan over all of them, each under a cond."""
    n, d = x_nd.shape
    k = w_pairs.shape[0] // n
    dt = x_nd.dtype
    f = gate_edf.shape[-1]
    y = jnp.zeros((n, d), dt)
    saved = []
    for expert, occupied, pad_pair in layout:
        s = pad_pair.shape[1]
        pw = w_pairs.astype(dt).at[pad_pair].get(mode="fill", fill_value=0)
        token = pad_pair // k  # n (out of range) on padding rows

        def compute(tok, wb, ex):
            xb = x_nd.at[tok].get(mode="fill", fill_value=0)
            g = jnp.einsum("bd,df->bf", xb, gate_edf[ex].astype(dt))
            u = jnp.einsum("bd,df->bf", xb, up_edf[ex].astype(dt))
            yb = jnp.einsum("bf,fd->bd", jax.nn.silu(g) * u, down_efd[ex].astype(dt))
            return yb * wb[:, None], g, u

        if dynamic:
            def loop(i, carry):
                y, g_all, u_all = carry
                yb, g, u = compute(token[i], pw[i], expert[i])
                return (y.at[token[i]].add(yb, mode="drop"),
                        jax.lax.dynamic_update_index_in_dim(g_all, g, i, 0),
                        jax.lax.dynamic_update_index_in_dim(u_all, u, i, 0))

            zeros = jnp.zeros((expert.shape[0], s, f), dt)
            y, g_all, u_all = jax.lax.fori_loop(0, occupied.sum(), loop, (y, zeros, zeros))
            saved.append((g_all, u_all))
            continue

        def body(y, xs, s=s):
            tok, wb, ex, used = xs

            def skip():
                return jnp.zeros((s, d), dt), jnp.zeros((s, f), dt), jnp.zeros((s, f), dt)

            yb, g, u = jax.lax.cond(used, lambda: compute(tok, wb, ex), skip)
            return y.at[tok].add(yb, mode="drop"), (g, u)

        y, gu = jax.lax.scan(body, y, (token, pw, expert, occupied))
        saved.append(gu)
    return y, tuple(saved)


def _grouped_swiglu_bwd(res, dy):
    """Cotangents of (x_nd, w_pairs, gate, up, down). Per occupied block of expert e
    with rows x, products g, u, gate weights w and output cotangent dy: dh = dy down_e^T,
    dw = sum(h * dh), dh *= w, dg = dh * u * silu'(g), du = dh * silu(g);
    dx = dg gate_e^T + du up_e^T; x^T dg, x^T du, (w h)^T dy are added into expert e's
    slices of the weight gradients."""
    layout, x_nd, w_pairs, gate_edf, up_edf, down_efd, saved = res
    n, d = x_nd.shape
    k = w_pairs.shape[0] // n
    dt = x_nd.dtype
    e, _, f = gate_edf.shape
    acc = jnp.float32
    dy = dy.astype(dt)
    carry = (jnp.zeros((n, d), dt), jnp.zeros((e, d, f), acc), jnp.zeros((e, d, f), acc),
             jnp.zeros((e, f, d), acc))
    dw_pairs = jnp.zeros(w_pairs.shape, w_pairs.dtype)
    for (expert, occupied, pad_pair), (g_all, u_all) in zip(layout, saved):
        pw = w_pairs.astype(dt).at[pad_pair].get(mode="fill", fill_value=0)
        token = pad_pair // k

        def block_grads(tok, g, u, wb, ex):
            xb = x_nd.at[tok].get(mode="fill", fill_value=0)
            dyb = dy.at[tok].get(mode="fill", fill_value=0)  # before the gate weight
            silu, dsilu = _silu_and_grad(g)
            h = silu * u
            dh = jnp.einsum("bd,fd->bf", dyb, down_efd[ex].astype(dt))
            dwb = jnp.sum(h * dh, -1)  # gradient of the row's gate weight
            dh = dh * wb[:, None]
            dg, du = dh * u * dsilu, dh * silu
            dxb = (jnp.einsum("bf,df->bd", dg, gate_edf[ex].astype(dt))
                   + jnp.einsum("bf,df->bd", du, up_edf[ex].astype(dt)))
            return (dxb, dwb, jnp.einsum("bd,bf->df", xb, dg).astype(acc),
                    jnp.einsum("bd,bf->df", xb, du).astype(acc),
                    jnp.einsum("bf,bd->fd", h * wb[:, None], dyb).astype(acc))

        def add(a, b, ex):
            return jax.lax.dynamic_update_index_in_dim(a, a[ex] + b, ex, 0)

        def body(i, carry):
            dx, dgate, dup, ddown, dwp = carry
            ex = expert[i]
            dxb, dwb, dg_e, du_e, dd_e = block_grads(token[i], g_all[i], u_all[i], pw[i], ex)
            return (dx.at[token[i]].add(dxb, mode="drop"), add(dgate, dg_e, ex),
                    add(dup, du_e, ex), add(ddown, dd_e, ex),
                    dwp.at[pad_pair[i]].add(dwb.astype(dwp.dtype), mode="drop"))

        *carry, dw_pairs = jax.lax.fori_loop(0, occupied.sum(), body, (*carry, dw_pairs))
    dx, dgate, dup, ddown = carry
    return (dx, dw_pairs, dgate.astype(gate_edf.dtype), dup.astype(up_edf.dtype),
            ddown.astype(down_efd.dtype))


def expert_ffn_blocks(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, block: int,
                      levels: Optional[int] = None):
    """Sorted, block-padded grouped SwiGLU: compute is (n*k + experts*block) rows at most
    (n*k + experts*block/4 with the default levels; n*k + 2*experts*block block slots),
    and only the occupied blocks run. Pairs whose expert id is outside [0, e) are skipped
    (no compute, zero output): expert parallelism marks pairs owned elsewhere that way.

    Blocks (`levels` > 0, default BLOCK_LEVELS; `_block_plan`): each expert's rows fill
    blocks of 2 * `block` rows; what is left (padded to a multiple of the smallest size,
    2 * block / 2**levels) takes at most one block of each smaller power-of-two size, so
    the padding is under block / 4 rows per expert (levels=3) rather than under `block`
    (levels=0: all blocks of `block` rows, as before). One loop per block size; each block gathers its
    rows from x_nd, multiplies them by its expert's weights and scatter-adds the
    gate-weighted result into the output (no [rows, d] padded copies of x or y).

    Differentiation: a custom JVP whose tangent map is a primitive of its own, transposed
    (reverse mode) by the same block loops run backwards: per block the input gradient and
    the expert's weight gradients, accumulated in place into one [e, d, f] float32 buffer
    per matrix (autodiff's transpose of a loop over blocks adds a full [e, d, f] cotangent
    per block instead). Only each block's gate and up products are kept from the forward
    pass (what `ModelConfig.remat` would keep), whatever `remat` says.
    Forward mode and vmap work; derivatives of second order do not. Under differentiation
    the loops run a dynamic number of iterations, the occupied blocks only; plain calls
    (and jaxprs) see a `lax.scan` over the static number of blocks with a `lax.cond`
    skipping the unoccupied ones: the same computation, its cost countable."""
    e = gate_edf.shape[0]
    plan = _block_plan(block, BLOCK_LEVELS if levels is None else levels)
    sizes, layout = _block_layout(experts_nk, e, plan)
    y = _grouped_swiglu(layout, x_nd, weights_nk.reshape(-1), gate_edf, up_edf, down_efd)
    return y, sizes


GROUPED_BLOCK_ROWS = 64  # rows per block of 'grouped' (a tensor-core tile; padding < 64 per expert)


def expert_ffn_grouped(x_nd, experts_nk, weights_nk, gate_edf, up_edf, down_efd, block: int,
                       impl: str):
    """The grouped SwiGLU as three grouped matmuls over every block at once: the pairs
    sorted by expert and padded per expert to a multiple of `block` rows (`_block_layout`,
    one block size), their tokens gathered into [blocks * block, d], the gate weights
    applied before the down product, the rows scatter-added back to their tokens.
    Differentiable through `grouped_matmul`'s VJP and the gathers; `impl`: see
    `grouped_matmul.IMPLS`. Pairs with an expert id outside [0, e) are skipped."""
    n, k = experts_nk.shape
    dt = x_nd.dtype
    sizes, ((expert, occupied, pad_pair),) = _block_layout(experts_nk, gate_edf.shape[0], (block,))
    block_expert = jnp.where(occupied, expert, -1)
    pair = pad_pair.reshape(-1)  # n * k on padding rows
    token = pair // k  # n (out of range) on padding rows
    x_md = x_nd.at[token].get(mode="fill", fill_value=0)
    w_m = weights_nk.reshape(-1).astype(dt).at[pair].get(mode="fill", fill_value=0)
    g = gmm.grouped_matmul(x_md, gate_edf.astype(dt), block_expert, impl)
    u = gmm.grouped_matmul(x_md, up_edf.astype(dt), block_expert, impl)
    h = jax.nn.silu(g) * u * w_m[:, None]
    y_md = gmm.grouped_matmul(h, down_efd.astype(dt), block_expert, impl)
    return jnp.zeros((n, x_nd.shape[1]), dt).at[token].add(y_md, mode="drop"), sizes


def resolve_moe_matmul(cfg: ModelConfig, block_rows: int = GROUPED_BLOCK_ROWS,
                       intermediate: Optional[int] = None) -> tuple[str, str]:
    """(dispatch, grouped_matmul impl) that `cfg.moe_matmul` resolves to on the default
    backend: 'auto' is 'grouped' with the Pallas kernels on GPU (their XLA reference where
    the shapes don't suit them), 'ragged_dot' on TPU and 'blocks' on CPU. `intermediate`:
    the experts' hidden width as the kernels see it (a shard of it under tensor parallelism)."""
    choice, backend = cfg.moe_matmul, jax.default_backend()
    if choice == "auto":
        choice = {"gpu": "grouped", "tpu": "ragged_dot"}.get(backend, "blocks")
    impl = "xla"
    if choice == "grouped" and backend == "gpu" and gmm.pallas_supported(
            block_rows, cfg.hidden_size, intermediate or cfg.moe_intermediate_size):
        impl = "pallas"
    return choice, impl


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


WIDE_MAX_TOKENS = 64  # above this, wide experts are stacked again for `blocks`


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WideExperts:
    """Routed experts side by side, the decode layout of `transformer.unstack_layers(...,
    experts=True)`: each projection of all experts is one matrix."""
    gate_up: jax.Array  # [d, e * 2 * f]: expert j's f gate columns, then its f up columns
    down: jax.Array  # [e * f, d]
    # (either may be a `layers.OutMajor` of that: `transformer.out_major_projections`)


def widen_experts(gate_edf: jax.Array, up_edf: jax.Array, down_efd: jax.Array) -> WideExperts:
    """Stacked experts -> `WideExperts` (one copy of the expert weights)."""
    e, d, f = gate_edf.shape
    gate_up = jnp.stack([gate_edf, up_edf], axis=1)  # [e, 2, d, f]
    return WideExperts(gate_up.transpose(2, 0, 1, 3).reshape(d, e * 2 * f), down_efd.reshape(e * f, -1))


def narrow_experts(wide: WideExperts, e: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`WideExperts` -> stacked (gate [e, d, f], up [e, d, f], down [e, f, d])."""
    gate_up, down = in_major(wide.gate_up), in_major(wide.down)
    d = gate_up.shape[0]
    f = down.shape[0] // e
    gate_up = gate_up.reshape(d, e, 2, f).transpose(1, 2, 0, 3)
    return gate_up[:, 0], gate_up[:, 1], down.reshape(e, f, d)


def expert_ffn_wide(x_nd, experts_nk, weights_nk, wide: WideExperts, e: int):
    """SwiGLU of every expert over all n tokens, each weighted by the token's gate weight
    for that expert (0 where not chosen), as two matrix products over `WideExperts`.
    e / k times the FLOPs of the grouped matmul, but for a decode step's few tokens the
    products are bound by reading the weights, which every expert needs anyway once a
    handful of tokens pick k of e; two wide products stream them about 2x faster on CPU
    than 3e small ones, and much faster than sorting and padding into blocks."""
    n = x_nd.shape[0]
    combine_ne = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_nk].add(weights_nk)
    h = linear(x_nd, wide.gate_up).reshape(n, e, 2, -1)
    act = jax.nn.silu(h[:, :, 0]) * h[:, :, 1] * combine_ne[:, :, None].astype(x_nd.dtype)
    y = linear(act.reshape(n, -1), wide.down)
    load = jnp.bincount(experts_nk.reshape(-1), length=e).astype(jnp.int32)
    return y, load


def moe(w: MoEWeights, x_btd: jax.Array, cfg: ModelConfig,
        experts_btk: Optional[jax.Array] = None, mesh_rules=None,
        token_mask_bt: Optional[jax.Array] = None) -> tuple[jax.Array, MoEStats]:
    """Routed experts + shared experts: [b, t, d] -> ([b, t, d], MoEStats).

    With a `mesh_rules` whose rules place `experts` on mesh axes of total size > 1, the
    routed experts run expert-parallel (`r1jax.model.expert_parallel`: the 'grouped'
    dispatch where `moe_matmul` resolves to it, else the block loop); routing and the
    shared experts stay in the sharded-jit world either way. `token_mask_bt` marks real tokens: padding is left
    out of the expert loads and the balance loss."""
    from r1jax.model import expert_parallel  # imports this module

    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    replay = None if experts_btk is None else experts_btk.reshape(b * t, -1)
    experts, weights, scores = route(x_nd, w, cfg, replay)
    grouped_rows = cfg.moe_block_size or GROUPED_BLOCK_ROWS
    dispatch, impl = resolve_moe_matmul(cfg, grouped_rows)
    wide = isinstance(w.gate, WideExperts)  # from `transformer.unstack_layers`
    if wide and b * t > WIDE_MAX_TOKENS:
        gate, up, down = narrow_experts(w.gate, cfg.n_routed_experts)
        w = dataclasses.replace(w, gate=gate, up=up, down=down)
        wide = False
    if wide:
        y, load = expert_ffn_wide(x_nd, experts, weights, w.gate, cfg.n_routed_experts)
    elif expert_parallel.enabled(cfg, mesh_rules):
        y = expert_parallel.routed_experts(x_nd, experts, weights, w, cfg, mesh_rules)
        load = jnp.bincount(experts.reshape(-1), length=cfg.n_routed_experts).astype(jnp.int32)
    elif dispatch == "ragged_dot":
        y, load = expert_ffn_ragged(x_nd, experts, weights, w.gate, w.up, w.down)
    elif dispatch == "grouped":
        y, load = expert_ffn_grouped(x_nd, experts, weights, w.gate, w.up, w.down,
                                     grouped_rows, impl)
    else:
        blk = cfg.moe_block_size or block_size(b * t * cfg.num_experts_per_tok, cfg.n_routed_experts)
        y, load = expert_ffn_blocks(x_nd, experts, weights, w.gate, w.up, w.down, blk)
    if w.shared is not None:
        y = y + swiglu(x_nd, w.shared.gate, w.shared.up, w.shared.down)
    experts_btk = experts.reshape(b, t, -1)
    mask = None
    if token_mask_bt is not None:
        mask = token_mask_bt.astype(jnp.float32)
        counted = jnp.repeat(mask.reshape(-1), cfg.num_experts_per_tok)
        load = jnp.bincount(experts.reshape(-1), weights=counted, length=cfg.n_routed_experts)
        load = load.astype(jnp.int32)
    terms, balance = None, jnp.zeros((), jnp.float32)
    if cfg.aux_loss_alpha:
        terms = balance_terms(scores.reshape(b, t, -1), experts_btk, cfg, mask)
        balance = balance_loss_from_terms(*terms, cfg)
    return y.reshape(b, t, d), MoEStats(load, balance, experts_btk, weights.reshape(b, t, -1), terms)
