"""The decoder: parameter declarations, init, and `forward`.

Layers of one kind are stacked along a leading `layers` axis and run with `lax.scan`, so
compile time does not grow with depth: DeepSeek models have a stack of dense layers
(the first `first_k_dense_replace`) and a stack of MoE layers; Qwen2/Llama have one
dense stack.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from r1jax import sharding as shd
from r1jax.configs import ModelConfig
from r1jax.model import attention as attn
from r1jax.model import mtp as mtp_lib
from r1jax.model.cache import KVCache, LayerCache, join_stack, split_stack
from r1jax.model.layers import OutMajor, embed, out_major, rms_norm, swiglu, unembed
from r1jax.model.moe import (MLPWeights, MoEStats, MoEWeights, WideExperts, mlp_infos, moe,
                             moe_infos, widen_experts)
from r1jax.model.rope import rope_angles
from r1jax.sharding import ArrayInfo, MeshRules, constrain, normal_init, ones_init


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockWeights:
    attn_norm: jax.Array  # [d]
    attn: Union[attn.MLAWeights, attn.GQAWeights]
    mlp_norm: jax.Array  # [d]
    mlp: Union[MLPWeights, MoEWeights]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    embed: jax.Array  # [v, d]
    dense_layers: Optional[BlockWeights]  # stacked [l, ...]
    moe_layers: Optional[BlockWeights]  # stacked [l, ...]
    final_norm: jax.Array  # [d]
    lm_head: Optional[jax.Array]  # [d, v]; None when tied to `embed` (decode layout: OutMajor)
    mtp: Optional[mtp_lib.MTPWeights]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    """logits [b, t, v] float32; mtp_logits [b, t, v] (position i predicts token i + 2) or
    None; aux: dict of `expert_load` [l_moe, e], `balance_loss` [], `balance_terms` (its
    per-row sums, `moe.balance_terms`, stacked [l_moe, ...]; None when alpha = 0),
    `experts` and `expert_weights` [l_moe, b, t, k], `hidden` [l + 1, b, t, d] (when asked),
    `final_hidden` [b, t, d] (before the final norm), `mtp_hidden`; cache."""

    logits: jax.Array
    mtp_logits: Optional[jax.Array]
    aux: dict
    cache: Optional[KVCache]


# Declarations --------------------------------------------------------------------------------

def block_infos(cfg: ModelConfig, with_moe: bool) -> BlockWeights:
    d, dt = cfg.hidden_size, cfg.weight_dtype
    return BlockWeights(
        attn_norm=ArrayInfo((d,), dt, ("embed",), ones_init),
        attn=attn.mla_infos(cfg) if cfg.is_mla else attn.gqa_infos(cfg),
        mlp_norm=ArrayInfo((d,), dt, ("embed",), ones_init),
        mlp=moe_infos(cfg) if with_moe else mlp_infos(cfg, cfg.intermediate_size),
    )


def param_infos(cfg: ModelConfig, with_mtp: bool = True) -> Params:
    """One `ArrayInfo` per weight: the single source of shapes, shardings and init."""
    d, v, dt = cfg.hidden_size, cfg.vocab_size, cfg.weight_dtype
    dense, moe_layers = cfg.num_dense_layers, cfg.num_moe_layers
    mtp = None
    if with_mtp and cfg.num_nextn_predict_layers:
        mtp = mtp_lib.mtp_infos(cfg, block_infos(cfg, with_moe=cfg.n_routed_experts > 0))
    return Params(
        embed=ArrayInfo((v, d), dt, ("vocab", "embed"), normal_init(1.0 if not cfg.tie_word_embeddings
                                                                   else d ** -0.5)),
        dense_layers=shd.stack_infos(block_infos(cfg, False), dense) if dense else None,
        moe_layers=shd.stack_infos(block_infos(cfg, True), moe_layers) if moe_layers else None,
        final_norm=ArrayInfo((d,), dt, ("embed",), ones_init),
        lm_head=None if cfg.tie_word_embeddings else ArrayInfo((d, v), dt, ("embed", "vocab"),
                                                               normal_init(d ** -0.5)),
        mtp=mtp,
    )


def _mesh_rules(mesh, rules) -> Optional[MeshRules]:
    if mesh is None:
        return None
    return MeshRules(mesh, rules or shd.default_rules())


def abstract_params(cfg: ModelConfig, mesh=None, rules=None, with_mtp: bool = True) -> Params:
    """Shapes, dtypes and (with a mesh) shardings of every weight; allocates nothing."""
    return shd.abstract(param_infos(cfg, with_mtp), _mesh_rules(mesh, rules))


def param_shardings(cfg: ModelConfig, mesh, rules=None, with_mtp: bool = True) -> Params:
    return shd.shardings(param_infos(cfg, with_mtp), _mesh_rules(mesh, rules))


def init_params(key: jax.Array, cfg: ModelConfig, mesh=None, rules=None,
                with_mtp: bool = True) -> Params:
    """Random parameters, created directly in their shardings when a mesh is given."""
    return _initializer(cfg, with_mtp, _mesh_rules(mesh, rules))(key)


@functools.lru_cache(maxsize=16)
def _initializer(cfg: ModelConfig, with_mtp: bool, mesh_rules: Optional[MeshRules]):
    return shd.initializer(param_infos(cfg, with_mtp), mesh_rules)


def param_count(cfg: ModelConfig, with_mtp: bool = False) -> int:
    """Number of parameters (MTP excluded by default: `main model` as papers count it)."""
    main = shd.count(param_infos(cfg, with_mtp=False))
    if not with_mtp:
        return main
    return shd.count(param_infos(cfg, with_mtp=True))


# Forward -------------------------------------------------------------------------------------

def block(w: BlockWeights, h_btd, cos, sin, mask_bts, cfg: ModelConfig,
          cache: Optional[LayerCache], start_b, experts_btk=None, mesh_rules=None, token_mask=None):
    """One pre-norm residual block. Returns (h, new layer cache, MoEStats or None)."""
    x = rms_norm(h_btd, w.attn_norm, cfg.rms_norm_eps)
    if cfg.is_mla:
        a, cache = attn.mla(w.attn, x, cos, sin, mask_bts, cfg, cache, start_b)
    else:
        a, cache = attn.gqa(w.attn, x, cos, sin, mask_bts, cfg, cache, start_b)
    h_btd = constrain(h_btd + a, ("batch", "seq", "act_embed"), mesh_rules)
    x = rms_norm(h_btd, w.mlp_norm, cfg.rms_norm_eps)
    stats = None
    if isinstance(w.mlp, MoEWeights):
        m, stats = moe(w.mlp, x, cfg, experts_btk, mesh_rules, token_mask)
    else:
        m = swiglu(x, w.mlp.gate, w.mlp.up, w.mlp.down)
    return constrain(h_btd + m, ("batch", "seq", "act_embed"), mesh_rules), cache, stats


def unstack_layers(params: Params, experts: bool = False) -> Params:
    """The same parameters with each layer stack [l, ...] split into a tuple of l layers,
    and with `experts=True` each MoE layer's routed experts laid side by side
    (`moe.WideExperts`).

    `forward` runs a tuple of layers as an unrolled Python loop instead of `lax.scan`,
    and wide experts through `moe.expert_ffn_wide` (for up to `moe.WIDE_MAX_TOKENS`
    tokens). The sampler decodes this way on CPU: there XLA copies every layer's (and every
    expert block's) weights out of their stack on each loop iteration (a dynamic slice),
    which in a memory-bound decode step costs more than the matrix products themselves.
    The split happens once per call, outside the decode loop, and holds a second copy of
    the weights meanwhile.
    """
    def split_experts(layer: BlockWeights) -> BlockWeights:
        m = layer.mlp
        if not experts or not isinstance(m, MoEWeights):
            return layer
        return dataclasses.replace(layer, mlp=dataclasses.replace(
            m, gate=widen_experts(m.gate, m.up, m.down), up=None, down=None))

    moe_layers = split_stack(params.moe_layers)
    if moe_layers is not None:
        moe_layers = tuple(split_experts(layer) for layer in moe_layers)
    return dataclasses.replace(params, dense_layers=split_stack(params.dense_layers),
                               moe_layers=moe_layers)


def out_major_projections(params: Params) -> Params:
    """The same parameters with the projections that `linear` applies (wide routed experts
    included) and the output head stored output-major (`layers.OutMajor`, one transposed
    copy each; a tied model's head is a view of the embedding table, which is output-major
    already). Layer stacks must be split (`unstack_layers`). The sampler decodes this way
    on CPU (see `layers.linear`).
    """
    def mlp(m):
        if isinstance(m, MoEWeights):
            if isinstance(m.gate, WideExperts):
                m = dataclasses.replace(m, gate=WideExperts(out_major(m.gate.gate_up),
                                                            out_major(m.gate.down)))
            return m if m.shared is None else dataclasses.replace(m, shared=mlp(m.shared))
        return MLPWeights(out_major(m.gate), out_major(m.up), out_major(m.down))

    def block_(layer: BlockWeights) -> BlockWeights:
        a = layer.attn
        if isinstance(a, attn.GQAWeights):
            a = dataclasses.replace(a, q=out_major(a.q), k=out_major(a.k), v=out_major(a.v),
                                    o=out_major(a.o, 2))
        else:
            a = dataclasses.replace(a, q_a=None if a.q_a is None else out_major(a.q_a),
                                    q_b=out_major(a.q_b), kv_a=out_major(a.kv_a), o=out_major(a.o, 2))
        return dataclasses.replace(layer, attn=a, mlp=mlp(layer.mlp))

    def stack(layers):
        if layers is None:
            return None
        if not isinstance(layers, tuple):
            raise ValueError("out_major_projections needs split layer stacks (unstack_layers)")
        return tuple(block_(layer) for layer in layers)

    v, d = params.embed.shape
    head = (OutMajor(params.embed, (d,), (v,)) if params.lm_head is None
            else out_major(params.lm_head))
    return dataclasses.replace(params, dense_layers=stack(params.dense_layers),
                               moe_layers=stack(params.moe_layers), lm_head=head)


def _run_stack(stack: BlockWeights, h, cos, sin, mask, cfg, cache, start, experts_lbtk,
               return_hidden, mesh_rules, token_mask=None):
    """The blocks of one layer kind: a `lax.scan` over the stack [l, ...], or an unrolled
    loop over a tuple of layers (from `unstack_layers`) and, without a cache or with a
    tuple of per-layer caches, when `cfg.unroll_layers` says so (None: on the CPU backend).
    A cache may be stacked or a tuple of per-layer caches; the unrolled loop returns a
    tuple."""
    def body(h, xs):
        w, layer_cache, experts = xs
        h, layer_cache, stats = block(w, h, cos, sin, mask, cfg, layer_cache, start, experts,
                                      mesh_rules, token_mask)
        return h, (layer_cache, stats, h if return_hidden else None)

    if cfg.remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    unroll = cfg.unroll_layers if cfg.unroll_layers is not None else jax.default_backend() == "cpu"
    if isinstance(stack, tuple) or (unroll and (cache is None or isinstance(cache, tuple))):
        layers = split_stack(stack)
        in_caches = split_stack(cache) if cache is not None else (None,) * len(layers)
        outs = []
        for i, (w, layer_cache) in enumerate(zip(layers, in_caches)):
            h, out = body(h, (w, layer_cache, None if experts_lbtk is None else experts_lbtk[i]))
            outs.append(out)
        caches, stats, hidden = zip(*outs)
        return h, (caches if cache is not None else None,
                   None if stats[0] is None else join_stack(stats),
                   jnp.stack(hidden) if return_hidden else None)
    if isinstance(cache, tuple):
        cache = join_stack(cache)
    return jax.lax.scan(body, h, (stack, cache, experts_lbtk))


def output_head(params: Params, h_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and output head: last hidden state [..., d] -> float32 logits [..., v]."""
    return unembed(rms_norm(h_btd, params.final_norm, cfg.rms_norm_eps), params.lm_head, params.embed)


def default_positions(tokens_bt: jax.Array, segment_ids_bt: Optional[jax.Array]) -> jax.Array:
    """0..t-1 per row, restarting at each new segment when segment ids are given."""
    b, t = tokens_bt.shape
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
        return index
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], 1)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start


@functools.partial(jax.jit, static_argnames=("cfg", "return_hidden", "with_mtp", "mesh_rules",
                                             "return_logits"))
def forward(params: Params, tokens: jax.Array, cfg: ModelConfig,
            positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
            cache: Optional[KVCache] = None, *, routing: Optional[dict] = None,
            return_hidden: bool = False, with_mtp: bool = True,
            logits_at: Optional[jax.Array] = None, token_mask: Optional[jax.Array] = None,
            mesh_rules: Optional[MeshRules] = None, return_logits: bool = True) -> ModelOutput:
    """Runs the model on tokens [b, t] int32.

    positions [b, t]: RoPE positions (default 0..t-1, or cache slots when decoding).
    segment_ids [b, t]: packed sequences; tokens attend only within their segment.
    cache: a `KVCache`; new tokens are written at slots `cache.lengths[b] + 0..t-1`, and
      the returned cache has `lengths + t`.
    routing: {'moe': [l_moe, b, t, k], 'mtp': [1, b, t, k]} experts to replay instead of
      routing afresh (the gate weights are still recomputed).
    logits_at [b]: compute logits only at this position of each row ([b, 1, v]); saves the
      output head over a whole prefill.
    token_mask [b, t]: real tokens (padding is left out of MoE loads and balance loss).
    with_mtp: also run the multi-token-prediction module when params have one (without a
      cache; the sampler drives MTP drafting itself through `r1jax.model.mtp.mtp_forward`).
    return_logits: False skips the output head (logits None): for callers that apply it
      to `aux['final_hidden']` themselves, in chunks (`r1jax.rl.rollout.policy_logprobs`).
    """
    b, t = tokens.shape
    if cache is not None and segment_ids is not None:
        raise ValueError("forward: segment_ids cannot be combined with a cache")
    dt = cfg.activation_dtype
    h = constrain(embed(tokens, params.embed, dt), ("batch", "seq", "act_embed"), mesh_rules)
    if cache is not None:
        start = cache.lengths
        q_index = start[:, None] + jnp.arange(t, dtype=jnp.int32)
        mask = attn.attention_mask(q_index, jnp.arange(cache.max_length, dtype=jnp.int32))
    else:
        start = None
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attn.attention_mask(q_index, jnp.arange(t, dtype=jnp.int32), segment_ids, segment_ids)
    if positions is None:
        positions = q_index if cache is not None else default_positions(tokens, segment_ids)
    cos, sin = rope_angles(positions, cfg)
    routing = routing or {}

    hidden = [h[None]]
    new_cache = {}
    aux: dict[str, Any] = {}
    for group in ("dense", "moe"):
        stack = getattr(params, f"{group}_layers")
        if stack is None:
            continue
        layer_cache = getattr(cache, group) if cache is not None else None
        h, (layer_cache, stats, hs) = _run_stack(stack, h, cos, sin, mask, cfg, layer_cache, start,
                                                 routing.get(group), return_hidden, mesh_rules,
                                                 token_mask)
        new_cache[group] = layer_cache
        if return_hidden:
            hidden.append(hs)
        if isinstance(stats, MoEStats):
            aux.update(expert_load=stats.load, balance_loss=stats.balance_loss.sum(),
                       experts=stats.experts, expert_weights=stats.weights,
                       balance_terms=stats.balance_terms)
    if return_hidden:
        aux["hidden"] = jnp.concatenate(hidden, axis=0)
    h_final = h
    h_head = h if logits_at is None else jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
    logits = output_head(params, h_head, cfg) if return_logits else None

    mtp_logits = None
    if params.mtp is not None and with_mtp and cache is None:
        next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        mtp_logits, mtp_h, _, mtp_stats = mtp_lib.mtp_forward(
            params.mtp, params, h_final, next_tokens, cos, sin, mask, cfg, block,
            experts_btk=None if routing.get("mtp") is None else routing["mtp"][0],
            mesh_rules=mesh_rules)
        aux["mtp_hidden"] = mtp_h
        if mtp_stats is not None:
            aux.update(mtp_expert_load=mtp_stats.load, mtp_experts=mtp_stats.experts[None],
                       mtp_balance_loss=mtp_stats.balance_loss)
    if cache is not None:
        cache = KVCache(lengths=cache.lengths + t, dense=new_cache.get("dense"),
                        moe=new_cache.get("moe"), mtp=cache.mtp)
    aux["final_hidden"] = h_final
    return ModelOutput(logits=logits, mtp_logits=mtp_logits, aux=aux, cache=cache)
