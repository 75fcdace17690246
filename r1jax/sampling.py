"""Generation: prefill of right-padded prompts, then a jitted decode loop over a KV cache.

`sample` returns the generated tokens only, the log-prob of each under
`softmax(logits / temperature)` *before* any top-k/top-p truncation (what the GRPO
ratio needs; computed by `losses.token_logprobs`, the function the trainer uses), the
lengths, and why each row stopped. With `speculative=True`, DeepSeek-V3's MTP module
drafts one token per step and the main model verifies it in the same forward pass;
acceptance follows speculative sampling, so the output distribution is exactly the
main model's (greedy: identical tokens).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.configs import ModelConfig
from r1jax.losses import token_logprobs
from r1jax.model import mtp as mtp_lib
from r1jax.model.attention import attention_mask
from r1jax.model.cache import KVCache, grow_cache, init_cache, unstack_cache
from r1jax.model.rope import rope_angles
from r1jax.model.transformer import Params, block, forward, out_major_projections, unstack_layers
from r1jax.sharding import MeshRules

FINISHED_LENGTH = 0  # reached max_new_tokens
FINISHED_STOP = 1  # emitted a stop token


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to generate.

    max_new_tokens: tokens to generate at most per row.
    temperature: 0 = greedy; log-probs are then those of softmax(logits).
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass in (0, 1].
    stop_token_ids: a row stops after emitting one of these (it is included).
    return_logprobs: compute per-token log-probs (cheap; off only to save a softmax).
    speculative: MTP self-speculative decoding (models with an MTP module).
    cache_length: slots per row (default prompt length + max_new_tokens (+1 speculative)).
    pad_id: written after a row has stopped.
    record_experts: return the MoE experts each position was routed to (routing replay).
    decode_windows: K, cache windows the plain decode loop grows through: the first
      holds the prompt and about max_new_tokens / K more slots, each next one that many
      more, the last the whole cache; each step's attention reads only its window (on
      CPU a step at batch 64 over 96 slots took 29 ms, over 192 38 ms). Each window
      compiles the loop body once more. None = max_new_tokens // 32, at most 4 (1 below
      64 new tokens).
    samples_per_prompt: G, how many rows continue each prompt: row i of the prompts
      becomes rows i*G .. i*G+G-1 of the samples, and its prefill runs once (GRPO's G
      completions of one prompt: the prompt's forward pass is not repeated G times).
    unroll_layers: decode with the layer stacks split into per-layer weights, and on one
      device the routed experts of models with up to 64 laid side by side (see
      `transformer.unstack_layers`): faster where XLA copies weights out of their stack
      on every step (CPU), at the cost of a second copy of the weights during the call.
      On one device the copy holds the projections and the output head output-major
      (`transformer.out_major_projections`), the form XLA:CPU's kernels run faster for a
      decode step's few rows. Pass params already converted by
      `out_major_projections(unstack_layers(params, experts=True))` to avoid the copy.
      None = on for the CPU backend, off elsewhere.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    return_logprobs: bool = True
    speculative: bool = False
    cache_length: Optional[int] = None
    pad_id: int = 0
    record_experts: bool = False
    decode_windows: Optional[int] = None
    samples_per_prompt: int = 1
    unroll_layers: Optional[bool] = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature={self.temperature}: expected >= 0")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k={self.top_k}: expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p={self.top_p}: expected a value in (0, 1]")
        if self.decode_windows is not None and self.decode_windows < 1:
            raise ValueError(f"SamplingConfig.decode_windows={self.decode_windows}: expected "
                             ">= 1 (or None)")
        if self.samples_per_prompt < 1:
            raise ValueError(f"SamplingConfig.samples_per_prompt={self.samples_per_prompt}: "
                             "expected >= 1")
        if self.record_experts and self.speculative:
            raise ValueError("SamplingConfig.record_experts is not supported with speculative=True")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Samples:
    """tokens [b, n] int32 (pad after the end), logprobs [b, n] float32, lengths [b] int32,
    finish_reason [b] int32 (FINISHED_LENGTH or FINISHED_STOP), drafts_accepted [b] and
    drafts_proposed [b] int32 (speculative decoding; zeros otherwise), experts
    [b, l_moe, S, k] int32 by cache slot (prompt then completion; -1 where nothing was
    routed) when `record_experts`, else None."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    drafts_accepted: jax.Array
    drafts_proposed: jax.Array
    experts: Optional[jax.Array] = None

    @property
    def acceptance_rate(self) -> float:
        proposed = int(np.sum(np.asarray(self.drafts_proposed)))
        return float(np.sum(np.asarray(self.drafts_accepted))) / max(proposed, 1)


# Token choice ----------------------------------------------------------------------------------

def filter_logits(logits_bv: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature-scaled float32 logits with everything outside top-k / top-p at -inf."""
    logits = logits_bv.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the most likely token always survives
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def draw(key: jax.Array, logits_bv: jax.Array, block: int = 128) -> jax.Array:
    """One index per row drawn with probability softmax(logits [b, v]), int32 [b]; an entry
    at -inf is never returned (each row needs one finite entry).

    Inverse-CDF sampling with one uniform per row, the CDF taken in two levels: the mass
    exp(logits - max) of each block of `block` entries (one pass that writes nothing of
    size b * v), then within the chosen block. `jax.random.categorical` draws a Gumbel per
    vocabulary entry instead: b * v random numbers, which on CPU cost more than the rest
    of a decode step's sampling (about 7 ms at b = 8, v = 32000; 30 ms at b = 32); a
    normalised softmax and one CDF over all entries took 5.7 ms at b = 64, this 1.7 ms.
    """
    b, v = logits_bv.shape
    logits = jnp.pad(logits_bv.astype(jnp.float32), ((0, 0), (0, -v % block)),
                     constant_values=-jnp.inf)
    top_b1 = jnp.max(logits, -1, keepdims=True)
    blocks_bnk = logits.reshape(b, -1, block)
    mass_bn = jnp.sum(jnp.exp(blocks_bnk - top_b1[:, :, None]), -1)
    cdf_bn = jnp.cumsum(mass_bn, -1)
    u_b1 = jax.random.uniform(key, (b, 1)) * cdf_bn[:, -1:]
    # rounding can put u at or past the end of the CDF: then the last entry with mass
    last_block_b1 = mass_bn.shape[1] - 1 - jnp.argmax(mass_bn[:, ::-1] > 0, -1, keepdims=True)
    chosen_b1 = jnp.minimum(jnp.sum(cdf_bn <= u_b1, -1, keepdims=True), last_block_b1)
    before_b1 = jnp.take_along_axis(cdf_bn - mass_bn, chosen_b1, -1)
    inner_bk = jnp.exp(jnp.take_along_axis(blocks_bnk, chosen_b1[:, :, None], 1)[:, 0] - top_b1)
    inner_cdf_bk = before_b1 + jnp.cumsum(inner_bk, -1)
    last_inner_b = block - 1 - jnp.argmax(inner_bk[:, ::-1] > 0, -1)
    index_b = jnp.minimum(jnp.sum(inner_cdf_bk <= u_b1, -1), last_inner_b)
    return (chosen_b1[:, 0] * block + index_b).astype(jnp.int32)


def choose(logits_bv: jax.Array, key: jax.Array, scfg: SamplingConfig) -> jax.Array:
    """One token per row: argmax when greedy, else a draw from the filtered distribution."""
    if scfg.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return draw(key, filter_logits(logits_bv, scfg.temperature, scfg.top_k, scfg.top_p))


def _logprob(logits_bv: jax.Array, tokens_b: jax.Array, scfg: SamplingConfig) -> jax.Array:
    temperature = scfg.temperature if scfg.temperature > 0 else 1.0
    return token_logprobs(logits_bv[:, None], tokens_b[:, None], temperature)[:, 0]


def _is_stop(tokens_b: jax.Array, scfg: SamplingConfig) -> jax.Array:
    if not scfg.stop_token_ids:
        return jnp.zeros(tokens_b.shape, bool)
    return jnp.isin(tokens_b, jnp.asarray(scfg.stop_token_ids, jnp.int32))


# Validation ------------------------------------------------------------------------------------

def _readable(x) -> bool:
    """Whether this process can read x's values: not a tracer, and not an array spread
    over several processes (each process checks its own rows before building such one)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def validate(cfg: ModelConfig, prompt_tokens, prompt_lengths, scfg: SamplingConfig,
             params: Optional[Params] = None) -> int:
    """Checks the inputs before anything compiles; returns the cache length."""
    shape = getattr(prompt_tokens, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"sample: prompt_tokens must be [batch, prompt_len] int32, got shape {shape}")
    b, p = shape
    if p == 0 or b == 0:
        raise ValueError(f"sample: empty prompt_tokens of shape {shape}")
    lshape = getattr(prompt_lengths, "shape", None)
    if lshape != (b,):
        raise ValueError(f"sample: prompt_lengths must have shape [{b}] to match prompt_tokens "
                         f"{shape}, got {lshape}")
    if _readable(prompt_lengths):
        lengths = np.asarray(prompt_lengths)
        if lengths.min() < 1:
            raise ValueError(f"sample: empty prompt (prompt_lengths has {int(lengths.min())}); every "
                             "row needs at least one token")
        if lengths.max() > p:
            raise ValueError(f"sample: prompt_lengths has {int(lengths.max())} > prompt_tokens width {p}")
    if _readable(prompt_tokens):
        ids = np.asarray(prompt_tokens)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"sample: prompt_tokens hold id {int(ids.min() if ids.min() < 0 else ids.max())} "
                             f"outside the vocabulary [0, {cfg.vocab_size})")
    bad = [t for t in scfg.stop_token_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"SamplingConfig.stop_token_ids: {bad[0]} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    if scfg.speculative and not (params is None or params.mtp is not None):
        raise ValueError("SamplingConfig.speculative=True needs a model with an MTP module "
                         "(params.mtp is None)")
    needed = p + scfg.max_new_tokens + (1 if scfg.speculative else 0)
    length = scfg.cache_length or needed
    if length < needed:
        raise ValueError(f"sample: prompt of {p} tokens + max_new_tokens {scfg.max_new_tokens} "
                         f"needs {needed} cache slots, but cache_length is {length}")
    return length


def sample(params: Params, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
           key: jax.Array, scfg: SamplingConfig = SamplingConfig(),
           mesh_rules: Optional[MeshRules] = None) -> Samples:
    """Generates up to `scfg.max_new_tokens` tokens after each right-padded prompt.

    prompt_tokens [p, P] int32 (right-padded), prompt_lengths [p] int32 in 1..P.
    Returns `Samples` of b = p * `scfg.samples_per_prompt` rows holding only generated
    tokens (row i * G + j: sample j of prompt i).
    """
    if isinstance(prompt_tokens, (list, tuple)):
        prompt_tokens = np.asarray(prompt_tokens, np.int32)
    if isinstance(prompt_lengths, (list, tuple)):
        prompt_lengths = np.asarray(prompt_lengths, np.int32)
    cache_length = validate(cfg, prompt_tokens, prompt_lengths, scfg, params)
    fn = _sample_speculative if scfg.speculative else _sample_plain
    return fn(params, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32),
              key, cfg=cfg, scfg=scfg, cache_length=cache_length, mesh_rules=mesh_rules)


# Plain decoding --------------------------------------------------------------------------------

def _prefill(params, prompt_tokens, prompt_lengths, cfg, cache_length, mesh_rules, repeats,
             with_mtp=False):
    """The prompts' forward pass into a fresh cache (with an MTP layer's when `with_mtp`):
    (logits of the last prompt token [b, v], experts [l, b, P, k] or None, final hidden
    [b, P, d], cache), each prompt's rows repeated `repeats` times after it ran once."""
    cache = init_cache(cfg, prompt_tokens.shape[0], cache_length, with_mtp=with_mtp)
    out = forward(params, prompt_tokens, cfg, cache=cache, with_mtp=False,
                  logits_at=prompt_lengths - 1, mesh_rules=mesh_rules)
    cache = dataclasses.replace(out.cache, lengths=prompt_lengths)
    logits, experts, hidden = out.logits[:, 0], out.aux.get("experts"), out.aux["final_hidden"]
    if repeats > 1:
        def rows(x, axis=0):
            return None if x is None else jnp.repeat(x, repeats, axis=axis)
        logits, experts, hidden = rows(logits), rows(experts, 1), rows(hidden)
        cache = KVCache(rows(cache.lengths), *(jax.tree.map(lambda a: rows(a, 1), group)
                                               for group in (cache.dense, cache.moe, cache.mtp)))
    return logits, experts, hidden, cache


UNROLL_MAX_EXPERTS = 64  # more experts than this stay stacked (program size, and FLOPs)


def _decode_layout(params, cache, cfg, scfg, mesh_rules):
    """Per-layer weights and caches for the decode loop when `scfg.unroll_layers` says so;
    on one device also wide experts (up to UNROLL_MAX_EXPERTS experts) and output-major
    projections and head."""
    unroll = scfg.unroll_layers
    if unroll is None:
        unroll = jax.default_backend() == "cpu"
    if not unroll:
        return params, cache
    one_device = mesh_rules is None
    wide = one_device and 0 < cfg.n_routed_experts <= UNROLL_MAX_EXPERTS
    params = unstack_layers(params, experts=wide)
    if one_device:
        params = out_major_projections(params)
    return params, unstack_cache(cache)


def decode_windows(prompt_width: int, cache_length: int, scfg: SamplingConfig) -> tuple[int, ...]:
    """Slots per row of each cache window of the plain decode loop (see
    `SamplingConfig.decode_windows`), increasing, the last `cache_length`."""
    n = scfg.max_new_tokens
    k = scfg.decode_windows or min(4, max(1, n // 32))
    sizes = [prompt_width + -(-n * i // k) for i in range(1, k)]
    return tuple(sorted(set(w for w in sizes if w < cache_length))) + (cache_length,)


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "cache_length", "mesh_rules"))
def _sample_plain(params, prompt_tokens, prompt_lengths, key, *, cfg, scfg, cache_length, mesh_rules):
    n, g, width = scfg.max_new_tokens, scfg.samples_per_prompt, prompt_tokens.shape[1]
    windows = decode_windows(width, cache_length, scfg)
    logits, prompt_experts, _, cache = _prefill(params, prompt_tokens, prompt_lengths, cfg,
                                                windows[0], mesh_rules, g)
    prompt_lengths = cache.lengths
    b = prompt_lengths.shape[0]
    params, cache = _decode_layout(params, cache, cfg, scfg, mesh_rules)
    record = scfg.record_experts and prompt_experts is not None
    experts = None
    if record:  # [l, b, S, k] by slot; prompt slots now, decode slots as they are fed
        l, _, p, k = prompt_experts.shape
        in_prompt = jnp.arange(p)[None, :, None] < prompt_lengths[:, None, None]  # not the padding
        prompt_experts = jnp.where(in_prompt, prompt_experts, -1)
        experts = jnp.full((l, b, cache_length, k), -1, jnp.int32).at[:, :, :p].set(prompt_experts)

    def emit(state, logits):
        step, cache, tokens, logprobs, done, lengths, reason, experts = state
        tok = choose(logits, jax.random.fold_in(key, step), scfg)
        tok = jnp.where(done, scfg.pad_id, tok)
        lp = jnp.where(done, 0.0, _logprob(logits, tok, scfg)) if scfg.return_logprobs else logprobs[:, 0]
        tokens = tokens.at[:, step].set(tok)
        logprobs = logprobs.at[:, step].set(lp)
        lengths = lengths + (~done).astype(jnp.int32)
        stopped = ~done & _is_stop(tok, scfg)
        reason = jnp.where(stopped, FINISHED_STOP, reason)
        return (step + 1, cache, tokens, logprobs, done | stopped, lengths, reason, experts), tok

    zeros = jnp.zeros((b,), jnp.int32)
    state = (jnp.int32(0), cache, jnp.full((b, n), scfg.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b,), bool), zeros, zeros + FINISHED_LENGTH, experts)
    state, tok = emit(state, logits)

    def body(carry):
        state, tok = carry
        slot = state[1].lengths
        out = forward(params, tok[:, None], cfg, cache=state[1], with_mtp=False, mesh_rules=mesh_rules)
        experts = state[7]
        if record:
            experts = jax.vmap(lambda buf, new, s: jax.lax.dynamic_update_slice_in_dim(buf, new, s, 1),
                               in_axes=(1, 1, 0), out_axes=1)(experts, out.aux["experts"], slot)
        state = (state[0], out.cache) + state[2:7] + (experts,)
        return emit(state, out.logits[:, 0])

    carry = (state, tok)
    for i, window in enumerate(windows):
        # the step fed `step - 1` tokens writes slot prompt length + step - 1 < window
        last = n if i == len(windows) - 1 else min(n, window - width + 1)
        if i:
            state, tok = carry
            carry = ((state[0], grow_cache(state[1], window)) + state[2:], tok)
        carry = jax.lax.while_loop(lambda c, last=last: (c[0][0] < last) & ~jnp.all(c[0][4]),
                                   body, carry)
    _, _, tokens, logprobs, _, lengths, reason, experts = carry[0]
    if experts is not None:
        experts = jnp.moveaxis(experts, 1, 0)
    return Samples(tokens, logprobs, lengths, reason, zeros, zeros, experts)


# MTP speculative decoding ----------------------------------------------------------------------

def _target_probs(logits_bv, scfg):
    """The distribution tokens are drawn from (filtered, temperature-scaled)."""
    return jax.nn.softmax(filter_logits(logits_bv, scfg.temperature, scfg.top_k, scfg.top_p), axis=-1)


def _verify(main_logits_bv, draft_logits_bv, draft_b, key, scfg):
    """Accepts the draft or replaces it, so that the result is distributed as the main model.

    Greedy: accept iff the draft is the main model's argmax (else take that argmax).
    Sampling: accept with probability min(1, p(d) / q(d)); on rejection draw from
    normalise(max(p - q, 0)) (speculative sampling, Leviathan et al. 2023).
    """
    if scfg.temperature == 0:
        best = jnp.argmax(main_logits_bv, axis=-1).astype(jnp.int32)
        return best == draft_b, best
    p = _target_probs(main_logits_bv, scfg)
    q = _target_probs(draft_logits_bv, scfg)
    k_accept, k_resample = jax.random.split(key)
    p_d = jnp.take_along_axis(p, draft_b[:, None], -1)[:, 0]
    q_d = jnp.take_along_axis(q, draft_b[:, None], -1)[:, 0]
    accept = jax.random.uniform(k_accept, p_d.shape) * q_d < p_d
    residual = jnp.maximum(p - q, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)
    fallback = draw(k_resample, jnp.log(residual))
    return accept, jnp.where(accept, draft_b, fallback)


def _draft(mtp_logits_bv, key, scfg):
    if scfg.temperature == 0:
        return jnp.argmax(mtp_logits_bv, axis=-1).astype(jnp.int32)
    return choose(mtp_logits_bv, key, scfg)


def _mtp(params, cfg, h_btd, next_tokens_bt, positions_bt, cache: KVCache, mesh_rules):
    """Runs the MTP block over new positions (slots `positions_bt`), writing its cache."""
    mask = attention_mask(positions_bt, jnp.arange(cache.max_length, dtype=jnp.int32))
    cos, sin = rope_angles(positions_bt, cfg)
    logits, _, mtp_cache, _ = mtp_lib.mtp_forward(
        params.mtp, params, h_btd, next_tokens_bt, cos, sin, mask, cfg, block,
        cache=cache.mtp, start_b=positions_bt[:, 0], mesh_rules=mesh_rules)
    return logits, mtp_cache


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "cache_length", "mesh_rules"))
def _sample_speculative(params, prompt_tokens, prompt_lengths, key, *, cfg, scfg, cache_length,
                        mesh_rules):
    n, g = scfg.max_new_tokens, scfg.samples_per_prompt
    first_logits, _, hidden, cache = _prefill(params, prompt_tokens, prompt_lengths, cfg,
                                              cache_length, mesh_rules, g, with_mtp=True)
    prompt_tokens, prompt_lengths = jnp.repeat(prompt_tokens, g, axis=0), cache.lengths
    b, p = prompt_tokens.shape
    rows = jnp.arange(b)
    params, cache = _decode_layout(params, cache, cfg, scfg, mesh_rules)
    last = prompt_lengths - 1
    first = choose(first_logits, jax.random.fold_in(key, 0), scfg)
    # MTP over the prompt: position j sees (h_j, token j+1); the last prompt position sees
    # the first sampled token and drafts the second.
    next_tokens = jnp.concatenate([prompt_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    next_tokens = next_tokens.at[rows, last].set(first)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    mtp_logits, mtp_cache = _mtp(params, cfg, hidden, next_tokens, positions,
                                 dataclasses.replace(cache, lengths=jnp.zeros((b,), jnp.int32)),
                                 mesh_rules)
    cache = dataclasses.replace(cache, mtp=mtp_cache)
    draft_logits = mtp_logits[rows, last]
    draft = _draft(draft_logits, jax.random.fold_in(key, 1), scfg)

    tokens = jnp.full((b, n + 2), scfg.pad_id, jnp.int32)
    logprobs = jnp.zeros((b, n + 2), jnp.float32)
    tokens = tokens.at[:, 0].set(first)
    logprobs = logprobs.at[:, 0].set(_logprob(first_logits, first, scfg))
    done = _is_stop(first, scfg) | (n == 1)
    reason = jnp.where(_is_stop(first, scfg), FINISHED_STOP, FINISHED_LENGTH).astype(jnp.int32)
    count = jnp.ones((b,), jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)
    # state: step, cache, pending token (emitted, not yet fed), draft + its logits, outputs
    state = (jnp.int32(1), cache, first, draft, draft_logits, tokens, logprobs, count, done, reason,
             zeros, zeros)

    def cond(state):
        return (state[0] < n + 1) & ~jnp.all(state[8])

    def body(state):
        step, cache, pending, draft, draft_logits, tokens, logprobs, count, done, reason, acc, prop = state
        k_verify, k_next, k_draft = jax.random.split(jax.random.fold_in(key, step + 1), 3)
        start = cache.lengths  # slot of `pending`
        out = forward(params, jnp.stack([pending, draft], 1), cfg, cache=cache, with_mtp=False,
                      mesh_rules=mesh_rules)
        accept, second = _verify(out.logits[:, 0], draft_logits, draft, k_verify, scfg)
        third = choose(out.logits[:, 1], k_next, scfg)
        # MTP on the two new positions: (h_pending, second), (h_draft, third)
        positions = start[:, None] + jnp.arange(2, dtype=jnp.int32)
        mtp_logits, mtp_cache = _mtp(params, cfg, out.aux["final_hidden"], jnp.stack([second, third], 1),
                                     positions, cache, mesh_rules)
        kept = 1 + accept.astype(jnp.int32)  # main-cache slots that stay valid
        cache = dataclasses.replace(out.cache, lengths=start + kept, mtp=mtp_cache)
        new_draft_logits = jnp.where(accept[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
        new_draft = _draft(new_draft_logits, k_draft, scfg)

        # emit `second`, and `third` when the draft was accepted
        lp2 = _logprob(out.logits[:, 0], second, scfg)
        lp3 = _logprob(out.logits[:, 1], third, scfg)
        live2 = ~done
        stop2 = live2 & _is_stop(second, scfg)
        live3 = live2 & ~stop2 & accept & (count + 1 < n)
        stop3 = live3 & _is_stop(third, scfg)
        tokens = tokens.at[rows, count].set(jnp.where(live2, second, tokens[rows, count]))
        logprobs = logprobs.at[rows, count].set(jnp.where(live2, lp2, logprobs[rows, count]))
        tokens = tokens.at[rows, count + 1].set(jnp.where(live3, third, tokens[rows, count + 1]))
        logprobs = logprobs.at[rows, count + 1].set(jnp.where(live3, lp3, logprobs[rows, count + 1]))
        new_count = count + live2.astype(jnp.int32) + live3.astype(jnp.int32)
        reason = jnp.where(stop2 | stop3, FINISHED_STOP, reason)
        acc = acc + (live2 & accept).astype(jnp.int32)
        prop = prop + live2.astype(jnp.int32)
        new_done = done | stop2 | stop3 | (new_count >= n)
        pending = jnp.where(accept, third, second)
        return (step + 1, cache, pending, new_draft, new_draft_logits, tokens, logprobs, new_count,
                new_done, reason, acc, prop)

    state = jax.lax.while_loop(cond, body, state)
    _, _, _, _, _, tokens, logprobs, count, _, reason, acc, prop = state
    return Samples(tokens[:, :n], logprobs[:, :n], count, reason, acc, prop)
