"""Attention: DeepSeek's multi-head latent attention (MLA) and grouped-query attention.

MLA has two mathematically equal paths. The naive one (training, prefill) expands the
latent into per-head keys and values. The weight-absorbed one (decode) folds the key
up-projection into the query and applies the value up-projection after attention, so
it attends directly over the cached latent (`kv_lora_rank + qk_rope_head_dim` values
per token).

Attention over several queries (training, scoring, prefill) runs as einsums in causal
chunks of query rows (XLA; the CPU choice), or as cuDNN's flash attention through
`jax.nn.dot_product_attention` (`ModelConfig.attention_impl`; the GPU choice in bf16).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from r1jax.configs import ModelConfig
from r1jax.model.cache import GQACache, MLACache, write_rows
from r1jax.model.layers import linear, rms_norm
from r1jax.model.rope import apply_rope
from r1jax.sharding import ArrayInfo, fan_in_init, ones_init, zeros_init

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use 1e-6 whatever rms_norm_eps says


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLAWeights:
    q_a: Optional[jax.Array]  # [d, q]      (None without query compression)
    q_a_norm: Optional[jax.Array]  # [q]
    q_b: jax.Array  # [q, n, h + r]  ([d, n, h + r] without query compression)
    kv_a: jax.Array  # [d, c + r]
    kv_a_norm: jax.Array  # [c]
    k_b: jax.Array  # [c, n, h]
    v_b: jax.Array  # [c, n, o]
    o: jax.Array  # [n, o, d]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GQAWeights:
    q: jax.Array  # [d, n, h]
    k: jax.Array  # [d, m, h]
    v: jax.Array  # [d, m, h]
    q_bias: Optional[jax.Array]  # [n, h]
    k_bias: Optional[jax.Array]  # [m, h]
    v_bias: Optional[jax.Array]  # [m, h]
    o: jax.Array  # [n, h, d]


def mla_infos(cfg: ModelConfig) -> MLAWeights:
    d, n, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    h, r, o, q = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    dt = cfg.weight_dtype
    compress = q is not None
    return MLAWeights(
        q_a=ArrayInfo((d, q), dt, ("embed", "q_lora"), fan_in_init(d)) if compress else None,
        q_a_norm=ArrayInfo((q,), dt, ("q_lora",), ones_init) if compress else None,
        q_b=ArrayInfo((q if compress else d, n, h + r), dt,
                      ("q_lora" if compress else "embed", "heads", "head_dim"),
                      fan_in_init(q if compress else d)),
        kv_a=ArrayInfo((d, c + r), dt, ("embed", "kv_lora"), fan_in_init(d)),
        kv_a_norm=ArrayInfo((c,), dt, ("kv_lora",), ones_init),
        k_b=ArrayInfo((c, n, h), dt, ("kv_lora", "heads", "head_dim"), fan_in_init(c)),
        v_b=ArrayInfo((c, n, o), dt, ("kv_lora", "heads", "head_dim"), fan_in_init(c)),
        o=ArrayInfo((n, o, d), dt, ("heads", "head_dim", "embed"), fan_in_init(n * o)),
    )


def gqa_infos(cfg: ModelConfig) -> GQAWeights:
    d, n, m, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.gqa_head_dim
    dt = cfg.weight_dtype
    bias = cfg.attention_bias
    return GQAWeights(
        q=ArrayInfo((d, n, h), dt, ("embed", "heads", "head_dim"), fan_in_init(d)),
        k=ArrayInfo((d, m, h), dt, ("embed", "kv_heads", "head_dim"), fan_in_init(d)),
        v=ArrayInfo((d, m, h), dt, ("embed", "kv_heads", "head_dim"), fan_in_init(d)),
        q_bias=ArrayInfo((n, h), dt, ("heads", "head_dim"), zeros_init) if bias else None,
        k_bias=ArrayInfo((m, h), dt, ("kv_heads", "head_dim"), zeros_init) if bias else None,
        v_bias=ArrayInfo((m, h), dt, ("kv_heads", "head_dim"), zeros_init) if bias else None,
        o=ArrayInfo((n, h, d), dt, ("heads", "head_dim", "embed"), fan_in_init(n * h)),
    )


def attention_mask(q_index_bt: jax.Array, kv_index_s: jax.Array,
                   q_segment_bt: Optional[jax.Array] = None,
                   kv_segment_bs: Optional[jax.Array] = None) -> jax.Array:
    """[b, t, s] bool: causal by slot index, and within the same segment when given."""
    mask = kv_index_s[None, None, :] <= q_index_bt[:, :, None]
    if q_segment_bt is not None:
        mask &= q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    return mask


def _softmax(scores_bnts: jax.Array, mask_bts: jax.Array, scale: float) -> jax.Array:
    scores = jnp.where(mask_bts[:, None], scores_bnts * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _f32_einsum(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


CAUSAL_CHUNK_ROWS = 64  # query rows per chunk without a cache (at least; at most
CAUSAL_MAX_CHUNKS = 16  # this many chunks, to bound the program's size)
FLASH_MIN_CACHED_QUERIES = 16  # fewer new tokens through a cache: decode-like (see below)


def flash_attention_applies(cfg: ModelConfig, head_dim: int, t: int, s: int,
                            cached: bool = False) -> bool:
    """Whether attention of t queries over s keys runs as cuDNN flash attention: asked for
    (`attention_impl='cudnn'`), or 'auto' on a GPU in bf16/fp16 with a head size cuDNN
    takes (a multiple of 8, <= 128; <= 256 from Hopper on). Never for decode steps (one
    query, or through a cache fewer than FLASH_MIN_CACHED_QUERIES, as speculative
    verification: memory-bound, and MLA's absorbed path reads only the latent cache), nor
    for odd lengths (cuDNN's masked backward needs even ones)."""
    fewest = FLASH_MIN_CACHED_QUERIES if cached else 2
    if cfg.attention_impl == "xla" or t < fewest or t % 2 or s % 2:
        return False
    if cfg.attention_impl == "cudnn":
        return True
    if jax.default_backend() != "gpu" or cfg.activation_dtype not in (jnp.bfloat16, jnp.float16):
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    largest = 256 if float(capability) >= 9.0 else 128
    return head_dim % 8 == 0 and head_dim <= largest


def _flash_attention(q_btnh, k_bsmh, v_bsmo, mask_bts, scale: float, causal: bool):
    """cuDNN flash attention: [b, t, n, o]. Values narrower than the keys (MLA) are padded
    with zeros to the key size, which `jax.nn.dot_product_attention` requires; the mask
    becomes cuDNN's additive bias, with `causal` letting it skip the masked-out tiles."""
    o = v_bsmo.shape[-1]
    pad = q_btnh.shape[-1] - o
    if pad:
        v_bsmo = jnp.pad(v_bsmo, ((0, 0), (0, 0), (0, 0), (0, pad)))
    out = jax.nn.dot_product_attention(q_btnh, k_bsmh, v_bsmo, mask=mask_bts[:, None],
                                       scale=scale, is_causal=causal, implementation="cudnn")
    return out[..., :o]


def _in_causal_chunks(core, queries: list, keys: list, mask_bts: jax.Array, chunked: bool):
    """`core(queries, keys, mask)` -> [b, t, ...], over chunks of query rows when `chunked`.

    queries: arrays with the t axis at 1; keys: (array, index of its s axis) pairs. Without
    a cache the mask is causal by slot, so a chunk of rows ending at row j sees no key
    after slot j: it scores keys [0, j) only, about half the work of the whole square,
    in score tensors small enough to stay in cache (with gqa's head-major rows, attention
    forward + backward 2.3x faster on CPU at t = 512).
    """
    if not chunked:
        return core(queries, [a for a, _ in keys], mask_bts)
    t = queries[0].shape[1]
    rows = max(CAUSAL_CHUNK_ROWS, -(-t // CAUSAL_MAX_CHUNKS))
    outs = []
    for i in range(0, t, rows):
        j = min(t, i + rows)
        outs.append(core([q[:, i:j] for q in queries],
                         [jax.lax.slice_in_dim(a, 0, j, axis=axis) for a, axis in keys],
                         mask_bts[:, i:j, :j]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _absorbed_is_cheaper(cfg: ModelConfig, t: int, s: int) -> bool:
    """Whether t queries over s cached latents take fewer FLOPs weight-absorbed (queries
    and outputs through the latent space, c wide) than with the latents' keys and values
    expanded per head (each of the s slots up-projected: cheaper for many queries, as in
    a training forward pass that continues a cached prompt)."""
    c, r, h, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    absorbed = t * (h * c + s * (2 * c + r) + c * v)
    expanded = s * c * (h + v) + t * s * (h + r + v)
    return absorbed <= expanded


def mla(w: MLAWeights, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, mask_bts: jax.Array,
        cfg: ModelConfig, cache: Optional[MLACache] = None, start_b: Optional[jax.Array] = None,
        absorbed: Optional[bool] = None):
    """Multi-head latent attention. Returns (output [b, t, d], updated cache or None).

    With a cache, the new tokens' latents are written at slots `start_b` and the queries
    attend over the whole cache (the mask selects valid slots); `absorbed` defaults to
    True with a cache, False without.
    """
    dt = x_btd.dtype
    h, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    if w.q_a is not None:
        q_lat = rms_norm(linear(x_btd, w.q_a), w.q_a_norm, LATENT_NORM_EPS)
        q_btnk = linear(q_lat, w.q_b)
    else:
        q_btnk = linear(x_btd, w.q_b)
    q_nope, q_rope = q_btnk[..., :h], apply_rope(q_btnk[..., h:], cos, sin, cfg.rope_interleave)

    kv_btk = linear(x_btd, w.kv_a)
    latent_btc = rms_norm(kv_btk[..., :c], w.kv_a_norm, LATENT_NORM_EPS)
    k_rope_btr = apply_rope(kv_btk[..., c:], cos, sin, cfg.rope_interleave)

    if cache is not None:
        entry = jnp.concatenate([latent_btc, k_rope_btr], axis=-1)
        cache = MLACache(write_rows(cache.latent_rope, entry, start_b))
        latent_bsc = cache.latent_rope[..., :c].astype(dt)
        k_rope_bsr = cache.latent_rope[..., c:].astype(dt)
    else:
        latent_bsc, k_rope_bsr = latent_btc, k_rope_btr
    t, s = x_btd.shape[1], latent_bsc.shape[1]
    flash = flash_attention_applies(cfg, cfg.qk_head_dim, t, s, cached=cache is not None)
    if absorbed is None:
        absorbed = cache is not None and not flash and _absorbed_is_cheaper(cfg, t, s)

    if absorbed:
        q_lat_btnc = jnp.einsum("btnh,cnh->btnc", q_nope, w.k_b.astype(dt))
        scores = (_f32_einsum("btnc,bsc->bnts", q_lat_btnc, latent_bsc)
                  + _f32_einsum("btnr,bsr->bnts", q_rope, k_rope_bsr))
        probs = _softmax(scores, mask_bts, cfg.softmax_scale).astype(dt)
        if t == 1:
            # a decode step: products summed over the slot axis instead of b tiny batched
            # matmuls, which XLA:CPU runs one by one (0.39 against 1.26 ms a layer at batch
            # 32: DeepSeek bench-small sampling 1.12x faster there)
            out_lat_btnc = jnp.sum(probs[:, :, 0, :, None] * latent_bsc[:, None], axis=2)[:, None]
        else:
            out_lat_btnc = jnp.einsum("bnts,bsc->btnc", probs, latent_bsc)
        out_btno = jnp.einsum("btnc,cno->btno", out_lat_btnc, w.v_b.astype(dt))
    elif flash:
        k_nope_bsnh, v_bsno = linear(latent_bsc, w.k_b), linear(latent_bsc, w.v_b)
        k_rope_bsnr = jnp.broadcast_to(k_rope_bsr[:, :, None],
                                       (*k_nope_bsnh.shape[:3], k_rope_bsr.shape[-1]))
        out_btno = _flash_attention(jnp.concatenate([q_nope, q_rope], -1),
                                    jnp.concatenate([k_nope_bsnh, k_rope_bsnr], -1), v_bsno,
                                    mask_bts, cfg.softmax_scale, cache is None)
    else:
        def core(queries, keys, mask):
            (q_nope_btnh, q_rope_btnr), (k_nope_bsnh, k_rope_bsr, v_bsno) = queries, keys
            scores = (_f32_einsum("btnh,bsnh->bnts", q_nope_btnh, k_nope_bsnh)
                      + _f32_einsum("btnr,bsr->bnts", q_rope_btnr, k_rope_bsr))
            probs = _softmax(scores, mask, cfg.softmax_scale).astype(dt)
            return jnp.einsum("bnts,bsno->btno", probs, v_bsno)

        keys = [(linear(latent_bsc, w.k_b), 1), (k_rope_bsr, 1), (linear(latent_bsc, w.v_b), 1)]
        out_btno = _in_causal_chunks(core, [q_nope, q_rope], keys, mask_bts, cache is None)
    return linear(out_btno, w.o, in_axes=2), cache


def gqa(w: GQAWeights, x_btd: jax.Array, cos: jax.Array, sin: jax.Array, mask_bts: jax.Array,
        cfg: ModelConfig, cache: Optional[GQACache] = None, start_b: Optional[jax.Array] = None):
    """Grouped-query attention with optional q/k/v biases (rotate-half RoPE).

    Key/value head j serves query heads j*G .. j*G+G-1 (G = heads / kv heads).
    Returns (output [b, t, d], updated cache or None).
    """
    dt = x_btd.dtype
    q, k, v = linear(x_btd, w.q), linear(x_btd, w.k), linear(x_btd, w.v)
    if w.q_bias is not None:
        q, k, v = q + w.q_bias.astype(dt), k + w.k_bias.astype(dt), v + w.v_bias.astype(dt)
    q = apply_rope(q, cos, sin, interleaved=False)
    k = apply_rope(k, cos, sin, interleaved=False)
    b, t, n, h = q.shape
    s = t if cache is None else cache.v.shape[2]
    flash = flash_attention_applies(cfg, h, t, s, cached=cache is not None)
    if flash and cache is None:
        out = _flash_attention(q, k, v, mask_bts, cfg.softmax_scale, causal=True)
        return linear(out, w.o, in_axes=2), None
    # keys [b, m, h, s] and values [b, m, s, h], the layouts of the cache: the score and
    # output contractions then read them in place (no per-step transpose of the cache)
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    if cache is not None:
        cache = GQACache(write_rows(cache.k, k, start_b, axis=3), write_rows(cache.v, v, start_b, axis=2))
        k, v = cache.k.astype(dt), cache.v.astype(dt)
    if flash:  # a prefill: over the whole cache, its mask selecting the written slots
        out = _flash_attention(q, k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3), mask_bts,
                               cfg.softmax_scale, causal=False)
        return linear(out, w.o, in_axes=2), cache
    m = k.shape[1]
    q_btmgh = q.reshape(b, t, m, n // m, h)
    if t == 1:
        # a decode step: products and sums instead of b * m tiny batched matmuls, which
        # XLA:CPU runs one by one (sampling 1.05x faster at batch 8, 1.3x at batch 32-64);
        # both sums run over a middle axis, whole rows at a time
        q_bmgh = q_btmgh[:, 0].astype(jnp.float32)
        scores = jnp.sum(q_bmgh[..., None] * k[:, :, None].astype(jnp.float32), -2)  # [b, m, g, s]
        probs = _softmax(scores.reshape(b, n, 1, -1), mask_bts, cfg.softmax_scale)
        probs_bmgs = probs.astype(dt).reshape(b, m, n // m, -1)
        out = jnp.sum(probs_bmgs[..., None] * v[:, :, None], -2).reshape(b, t, n, h)
    else:
        def core(queries, keys, mask):
            # query rows head-major [b, m, g * c, h] like the keys: two plain batched
            # matmuls over (b, m), and no transposes of the scores
            (q_bcmgh,), (k_bmhs, v_bmsh) = queries, keys
            c, g = q_bcmgh.shape[1], n // m
            q_bmqh = q_bcmgh.transpose(0, 2, 3, 1, 4).reshape(b, m, g * c, h)
            scores = _f32_einsum("bmqh,bmhs->bmqs", q_bmqh, k_bmhs).reshape(b, n, c, -1)
            probs = _softmax(scores, mask, cfg.softmax_scale).astype(dt).reshape(b, m, g * c, -1)
            out = jnp.einsum("bmqs,bmsh->bmqh", probs, v_bmsh).reshape(b, m, g, c, h)
            return out.transpose(0, 3, 1, 2, 4).reshape(b, c, n, h)

        out = _in_causal_chunks(core, [q_btmgh], [(k, 3), (v, 2)], mask_bts, cache is None)
    return linear(out, w.o, in_axes=2), cache
