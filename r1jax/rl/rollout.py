"""Rollouts: prompts x G -> `sample` -> decode -> rewards -> advantages -> a `RolloutBatch`.

Every batch has fixed shapes (`[n, P + max_new_tokens]`), so the train step compiles
once. DAPO's dynamic sampling drops groups whose rewards are all equal and refills the
batch from further prompts. With routing replay the experts each token was routed to
during the rollout travel in the batch, so the training forward uses the same experts.

Multi-process runs (`jax.process_count() > 1`, a mesh spanning all processes): each
process handles only its own prompts (`process_prompts`), whole groups of G rows. Their
prompt rows form one global batch for the sampler; each process reads back, decodes and
scores only its own rows (`sample_rows`), and `assemble_batch` lays the rows of all
processes out as global arrays over the mesh's batch axes. On one process all of this
reduces to the plain calls, with the same results as before.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.configs import ModelConfig
from r1jax.data.padding import tokenize_prompts
from r1jax.losses import linear_logprobs
from r1jax.model.shared_prefix import forward_shared_prefix, prefix_sharing_applies
from r1jax.model.layers import in_major, rms_norm
from r1jax.model.transformer import Params, forward
from r1jax.rl import grpo
from r1jax.sampling import FINISHED_LENGTH, Samples, SamplingConfig, sample, validate
from r1jax.sharding import (MeshRules, batch_sharding, global_batch, local_rows, process_rows,
                            process_sum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutBatch:
    """One GRPO batch of n = prompts x G sequences, T = prompt width + max_new_tokens.

    tokens [n, T] int32: prompt then completion, right-padded.
    mask [n, T-1] float32: 1 where target token t+1 is a completion token.
    advantages [n] float32; rewards [n] float32; lengths [n] int32 (completion tokens);
    truncated [n] bool (hit max_new_tokens without a stop token).
    old_logp, ref_logp [n, T-1] float32 or None (None: mu = 1 / beta = 0).
    experts [n, l_moe, T, k] int32 or None: routing to replay (-1: route afresh).
    completion_width (static): N, the most completion tokens of a row, or None. With it,
    log-probs are computed only over each row's N positions from its first target (the
    prompt's positions need none): the output head, the costliest layer of a small
    model, then runs on N of the T - 1 positions.
    group_size (static): G, when rows i*G .. i*G+G-1 share one prompt (`assemble_batch`
    sets it): the prompt's forward pass then runs once per group (`policy_logprobs`).
    """

    tokens: jax.Array
    mask: jax.Array
    advantages: jax.Array
    rewards: jax.Array
    lengths: jax.Array
    truncated: jax.Array
    old_logp: Optional[jax.Array] = None
    ref_logp: Optional[jax.Array] = None
    experts: Optional[jax.Array] = None
    completion_width: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
    group_size: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))

    def logprob_positions(self) -> Optional[jax.Array]:
        """[n, N] int32: the positions whose log-probs the loss reads (see above), or None."""
        if self.completion_width is None:
            return None
        start = jnp.argmax(self.mask > 0, axis=1).astype(jnp.int32)
        return start[:, None] + jnp.arange(self.completion_width, dtype=jnp.int32)


@dataclasses.dataclass
class Groups:
    """Host-side results of one generation round, G rows per prompt (numpy)."""

    examples: list
    completions: list  # n strings
    prompt_tokens: np.ndarray  # [n, P]
    prompt_lengths: np.ndarray  # [n]
    tokens: np.ndarray  # [n, N]
    lengths: np.ndarray  # [n]
    truncated: np.ndarray  # [n]
    rewards: np.ndarray  # [b, G]
    experts: Optional[np.ndarray]  # [n, l, S, k]

    def select(self, groups: np.ndarray) -> "Groups":
        g = self.rewards.shape[1]
        rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
        return Groups([self.examples[i] for i in groups], [self.completions[i] for i in rows],
                      self.prompt_tokens[rows], self.prompt_lengths[rows], self.tokens[rows],
                      self.lengths[rows], self.truncated[rows], self.rewards[groups],
                      None if self.experts is None else self.experts[rows])

    @staticmethod
    def concat(parts: Sequence["Groups"]) -> "Groups":
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Groups(sum((p.examples for p in parts), []), sum((p.completions for p in parts), []),
                      cat("prompt_tokens"), cat("prompt_lengths"), cat("tokens"), cat("lengths"),
                      cat("truncated"), cat("rewards"),
                      None if parts[0].experts is None else cat("experts"))


# Processes -----------------------------------------------------------------------------------

def process_prompts(mesh_rules: Optional[MeshRules], num_prompts: int,
                    num_generations: int) -> slice:
    """The prompts of a `num_prompts` x G batch that this process generates and scores.

    All of them on one process. In a multi-process run, the prompts whose G rows lie on
    this process's devices (`sharding.process_rows`); a process must hold whole groups,
    since advantages are computed per group."""
    if mesh_rules is None or jax.process_count() == 1:
        return slice(0, num_prompts)
    g, n = num_generations, num_prompts * num_generations
    try:
        rows = process_rows(mesh_rules, n)
    except ValueError as err:
        raise ValueError(f"{num_prompts} prompts x {g} generations = {n} rows cannot be split "
                         f"over the mesh's batch axes: {err}") from err
    if rows.start % g or rows.stop % g:
        raise ValueError(f"process {jax.process_index()} holds rows {rows.start}..{rows.stop} of "
                         f"{num_prompts} prompts x {g} generations, which splits a group of "
                         f"{g}; make the number of prompts a multiple of the number of batch "
                         "shards (or G a multiple of the rows per shard)")
    return slice(rows.start // g, rows.stop // g)


def _global_rows(what: str, num_prompts: Optional[int], num_generations: int) -> Optional[int]:
    """Rows of the global batch in a multi-process run; None on one process."""
    if jax.process_count() == 1:
        return None
    if num_prompts is None:
        raise ValueError(f"{what}: in a multi-process run pass num_prompts, the number of "
                         "prompts of all processes together (each process passes its own "
                         "`process_prompts`)")
    return num_prompts * num_generations


@functools.partial(jax.jit, static_argnames=("cfg", "scfg", "mesh_rules"))
def _sample_global(params, tokens, lengths, key, *, cfg, scfg, mesh_rules):
    # traced, so `sample` checks shapes only: the values were checked per process
    out = sample(params, cfg, tokens, lengths, key, scfg, mesh_rules=mesh_rules)
    sharding = batch_sharding(mesh_rules)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), out)


def sample_rows(params: Params, cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray,
                key: jax.Array, scfg: SamplingConfig, *, mesh_rules: Optional[MeshRules] = None,
                global_rows: Optional[int] = None) -> Samples:
    """`sample` on this process's prompts; the `Samples` of their rows as numpy.

    tokens [r, P] int32, lengths [r]: r prompts, each sampled `scfg.samples_per_prompt`
    (G) times, so r * G rows come back (row i * G + j: sample j of prompt i). One
    process: all prompts (`global_rows` unused), each prefilled once. Multi-process: this
    process's prompts, whose r * G rows are rows `process_rows(mesh_rules, global_rows)`
    of a global batch of `global_rows` rows; the rows of all processes are sampled
    together as one batch laid out over the mesh's batch axes (the prompts repeated G
    times: every row its own prefill), and each process gets its own back.
    """
    if jax.process_count() == 1:
        out = sample(params, cfg, tokens, lengths, key, scfg, mesh_rules=mesh_rules)
        return jax.tree.map(np.asarray, out)
    if mesh_rules is None or global_rows is None:
        raise ValueError("sample_rows: a multi-process run needs mesh_rules (a mesh over all "
                         "processes' devices) and global_rows (rows of all processes together)")
    rows = process_rows(mesh_rules, global_rows)
    g = scfg.samples_per_prompt
    tokens = np.repeat(np.asarray(tokens, np.int32), g, axis=0)
    lengths = np.repeat(np.asarray(lengths, np.int32), g, axis=0)
    scfg = dataclasses.replace(scfg, samples_per_prompt=1)
    if len(tokens) != rows.stop - rows.start:
        raise ValueError(f"sample_rows: process {jax.process_index()} passed {len(tokens) // g} "
                         f"prompts x {g} samples = {len(tokens)} rows but feeds rows "
                         f"{rows.start}..{rows.stop} of {global_rows}")
    validate(cfg, tokens, lengths, scfg, params)
    tokens_g, lengths_g = global_batch((tokens, lengths), mesh_rules, global_rows)
    out = _sample_global(params, tokens_g, lengths_g, key, cfg=cfg, scfg=scfg,
                         mesh_rules=mesh_rules)
    return jax.tree.map(lambda x: local_rows(x, rows), out)


# Generation ----------------------------------------------------------------------------------

def generate_groups(params: Params, cfg: ModelConfig, examples: list, *, tokenizer,
                    prompt_fn: Callable[[dict], str], reward_fn: Callable[..., float],
                    num_generations: int, scfg: SamplingConfig, key: jax.Array, prompt_len: int,
                    mesh_rules: Optional[MeshRules] = None,
                    num_prompts: Optional[int] = None) -> Groups:
    """Samples G completions per example and scores them with `reward_fn(completion, **example)`.

    In a multi-process run `examples` are this process's prompts (`process_prompts`) and
    `num_prompts` counts those of all processes; the returned groups are this process's.
    """
    global_rows = _global_rows("generate_groups", num_prompts, num_generations)
    prompts = [prompt_fn(ex) for ex in examples]
    tokens, lengths = tokenize_prompts(tokenizer, prompts, prompt_len)
    samples = sample_rows(params, cfg, tokens, lengths, key,
                          dataclasses.replace(scfg, samples_per_prompt=num_generations),
                          mesh_rules=mesh_rules, global_rows=global_rows)
    tokens = np.repeat(np.asarray(tokens), num_generations, axis=0)
    lengths = np.repeat(np.asarray(lengths), num_generations, axis=0)
    out_tokens, out_lengths = samples.tokens, samples.lengths
    truncated = samples.finish_reason == FINISHED_LENGTH
    completions = [tokenizer.decode(out_tokens[i, :out_lengths[i]]) for i in range(len(out_tokens))]
    rewards = np.array([float(reward_fn(c, **examples[i // num_generations]))
                        for i, c in enumerate(completions)], np.float32)
    return Groups(list(examples), completions, tokens, lengths, out_tokens, out_lengths, truncated,
                  rewards.reshape(len(examples), num_generations), samples.experts)


def collect_groups(generate: Callable[[list, jax.Array], Groups], next_examples: Iterator[list],
                   key: jax.Array, num_prompts: int, dynamic_sampling: bool,
                   max_rounds: int = 8) -> tuple[Groups, dict]:
    """One round of generation, or (DAPO dynamic sampling) as many rounds as it takes to fill
    `num_prompts` groups whose rewards are not all equal (at most `max_rounds`; if that is
    not enough, the batch is completed with the remaining groups so shapes stay fixed).

    In a multi-process run `num_prompts` is this process's share; every process generates
    the same number of rounds (until all are full) and `info` counts all processes."""
    first = generate(next(next_examples), jax.random.fold_in(key, 0))
    if not dynamic_sampling:
        return first, {"rounds": 1, "kept_groups_frac": 1.0}
    kept, spare, rounds, seen = [], [], 0, 0
    groups = first
    while True:
        rounds += 1
        seen += len(groups.examples)
        signal = np.asarray(grpo.groups_with_signal(groups.rewards))
        kept.append(groups.select(np.nonzero(signal)[0]))
        spare.append(groups.select(np.nonzero(~signal)[0]))
        filled = sum(len(k.examples) for k in kept)
        short = int(process_sum(np.int32(filled < num_prompts)))  # processes not yet full
        if short == 0 or rounds >= max_rounds:
            break
        groups = generate(next(next_examples), jax.random.fold_in(key, rounds))
    useful = Groups.concat(kept + spare)  # groups with signal first
    kept_all, wanted_all, filled_all, seen_all = (int(x) for x in process_sum(
        np.array([min(filled, num_prompts), num_prompts, filled, seen], np.int32)))
    return useful.select(np.arange(num_prompts)), {
        "rounds": rounds, "kept_groups_frac": kept_all / wanted_all,
        "signal_groups_frac": filled_all / seen_all}


def policy_logprobs(params: Params, tokens_nT: jax.Array, cfg: ModelConfig, temperature: float = 1.0,
                    experts: Optional[jax.Array] = None, mesh_rules: Optional[MeshRules] = None,
                    with_entropy: bool = False, token_mask: Optional[jax.Array] = None,
                    positions: Optional[jax.Array] = None, group_size: Optional[int] = None):
    """(log pi(token t+1 | tokens <= t) [n, T-1] float32, entropy [n, T-1] or None, aux).

    The trainer's log-probs; `experts` [n, l_moe, T, k] replays a recorded routing;
    `token_mask` [n, T] marks real tokens (for the MoE load statistics); `positions`
    [n, W] int32, when given, are the only positions computed (the others are 0; indices
    past T - 2 are ignored).

    group_size G (with `positions`): rows i*G .. i*G+G-1 share their tokens before their
    first position + 1 (a GRPO group's prompt), which lie within the first T - W tokens,
    and their positions are consecutive. The prompt's forward pass then runs once per
    group where `prefix_sharing_applies` (`r1jax.model.shared_prefix`): the same
    log-probs for less work; aux then holds only the MoE `expert_load` and `balance_loss`.
    """
    sharing = positions is not None and prefix_sharing_applies(cfg, tokens_nT.shape[0], group_size,
                                                               mesh_rules)
    if not sharing:
        routing = None if experts is None else {"moe": jnp.moveaxis(experts, 0, 1)}
        out = forward(params, tokens_nT, cfg, routing=routing, with_mtp=False,
                      token_mask=token_mask, mesh_rules=mesh_rules, return_logits=False)
        h, aux = out.aux["final_hidden"][:, :-1], out.aux
        if positions is None:
            logp, ent = head_logprobs(params, h, tokens_nT[:, 1:], cfg, temperature, with_entropy)
            return logp, ent, aux
    t = tokens_nT.shape[1] - 1
    valid = positions < t
    index = jnp.minimum(positions, t - 1)
    at = lambda a, shift=0: None if a is None else jnp.take_along_axis(a, index + shift, axis=1)  # noqa: E731
    targets = at(tokens_nT, 1)
    if sharing:
        first, p = slice(None, None, group_size), tokens_nT.shape[1] - positions.shape[1]
        # a row without completion tokens starts at 0 (`logprob_positions`); its values are masked
        prefix_lengths = index[:, 0].reshape(-1, group_size).max(1) + 1
        h, aux = forward_shared_prefix(
            params, tokens_nT[first, :p], prefix_lengths, targets, cfg, group_size,
            prefix_experts=None if experts is None else jnp.moveaxis(experts[first, :, :p], 0, 1),
            experts=None if experts is None else jnp.moveaxis(
                jnp.take_along_axis(experts, (index + 1)[:, None, :, None], axis=2), 0, 1),
            prefix_token_mask=None if token_mask is None else token_mask[first, :p],
            token_mask=at(token_mask, 1), mesh_rules=mesh_rules)
    else:
        h = jnp.take_along_axis(h, index[..., None], axis=1)
    logp, ent = head_logprobs(params, h, targets, cfg, temperature, with_entropy)

    def spread(values_nw):  # back to [n, T-1]; clipped duplicates add zeros
        rows = jnp.arange(values_nw.shape[0])[:, None]
        return jnp.zeros((values_nw.shape[0], t), values_nw.dtype).at[rows, index].add(
            jnp.where(valid, values_nw, 0))

    return spread(logp), (spread(ent) if with_entropy else None), aux


LOGPROB_CHUNK_TOKENS = 4096  # logits held at once by `head_logprobs`: rows x positions
KEPT_LOGITS_BYTES = 1 << 30  # logits of up to this size are kept for the backward pass
UNROLLED_KEPT_CHUNKS = 8  # kept chunks up to this many run as a loop written out


def head_logprobs(params: Params, h_ntd: jax.Array, targets_nt: jax.Array, cfg: ModelConfig,
                  temperature: float = 1.0, with_entropy: bool = False,
                  chunk_tokens: int = LOGPROB_CHUNK_TOKENS,
                  kept_logits_bytes: int = KEPT_LOGITS_BYTES):
    """Final norm, output head and log-probs of `targets` [n, t] from the last hidden state
    h [n, t, d], in chunks of positions: (logp [n, t] float32, entropy [n, t] or None).

    The logits of a whole batch ([n, t, vocab] float32: 1.6 GB for 64 x 191 tokens of a
    32k vocabulary, and as much again for their gradient) never exist at once: each chunk
    of about `chunk_tokens` tokens is computed in turn (`losses.linear_logprobs`: the
    logits' gradient in one pass). For the backward pass the chunks' logits are kept while
    all of them take at most `kept_logits_bytes` (that much more memory), and recomputed
    otherwise (a third more of the head's FLOPs; on CPU a GRPO update of 8,192
    positions, 1 GB of logits, took 15.5 s recomputing them and 14.6 s keeping them).
    Chunks run along positions, so rows keep their sharding over the batch axes.
    """
    n, t, d = h_ntd.shape
    span = max(1, min(t, chunk_tokens // max(n, 1)))
    chunks = -(-t // span)
    pad = chunks * span - t
    keep = n * chunks * span * cfg.vocab_size * 4 <= kept_logits_bytes
    tied = params.lm_head is None
    weight = params.embed if tied else in_major(params.lm_head)

    def one(h_nsd, targets_ns):
        h = rms_norm(h_nsd, params.final_norm, cfg.rms_norm_eps).reshape(-1, d)
        logp, ent = linear_logprobs(h, weight, targets_ns.reshape(-1), vocab_major=tied,
                                    temperature=temperature, with_entropy=with_entropy,
                                    keep_logits=keep)
        logp = logp.reshape(targets_ns.shape)
        return logp, (ent.reshape(logp.shape) if with_entropy else jnp.zeros_like(logp))

    if chunks == 1:
        logp, ent = one(h_ntd, targets_nt)
    else:
        h = jnp.pad(h_ntd, ((0, 0), (0, pad), (0, 0))).reshape(n, chunks, span, -1)
        targets = jnp.pad(targets_nt, ((0, 0), (0, pad))).reshape(n, chunks, span)
        if keep and chunks <= UNROLLED_KEPT_CHUNKS:
            # a loop of a few chunks in the program: a loop's kept logits would be copied
            # into one stacked buffer (on CPU that costs about as much as recomputing them)
            logp, ent = map(jnp.stack, zip(*(one(h[:, i], targets[:, i]) for i in range(chunks))))
        else:
            logp, ent = jax.lax.map(lambda xs: one(*xs), (jnp.moveaxis(h, 1, 0), jnp.moveaxis(targets, 1, 0)))
        logp = jnp.moveaxis(logp, 0, 1).reshape(n, -1)[:, :t]
        ent = jnp.moveaxis(ent, 0, 1).reshape(n, -1)[:, :t]
    return logp, (ent if with_entropy else None)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "mesh_rules", "group_size"))
def sequence_logprobs(params: Params, tokens_nT: jax.Array, cfg: ModelConfig, temperature: float = 1.0,
                      experts: Optional[jax.Array] = None, mesh_rules: Optional[MeshRules] = None,
                      positions: Optional[jax.Array] = None, group_size: Optional[int] = None):
    """Jitted `policy_logprobs` without entropy: [n, T-1] float32."""
    return policy_logprobs(params, tokens_nT, cfg, temperature, experts, mesh_rules,
                           positions=positions, group_size=group_size)[0]


def _groups_share_prompts(groups: Groups, g: int) -> bool:
    """Whether the G rows of every group have the same prompt (as `generate_groups` makes
    them), so the batch may run each prompt's forward pass once."""
    def same(x):
        x = np.asarray(x).reshape(-1, g, *np.shape(x)[1:])
        return bool(np.all(x == x[:, :1]))
    prompt = np.where(np.arange(groups.prompt_tokens.shape[1]) < groups.prompt_lengths[:, None],
                      groups.prompt_tokens, 0)
    return same(groups.prompt_lengths) and same(prompt)


def assemble_batch(groups: Groups, cfg: ModelConfig, grpo_cfg: grpo.GRPOConfig, *, params: Params,
                   ref_params: Optional[Params] = None, mesh_rules: Optional[MeshRules] = None,
                   routing_replay: bool = False, num_prompts: Optional[int] = None,
                   share_prompts: bool = True) -> RolloutBatch:
    """Lays prompt + completion out left-aligned, computes advantages, and the old / reference
    log-probs that the objective needs (none with mu = 1 and beta = 0).

    share_prompts: where the G rows of every group have the same prompt (as
    `generate_groups` makes them), set `RolloutBatch.group_size`, so the log-probs here
    and in the train step run each prompt's forward pass once (False: every row its own).

    In a multi-process run `groups` are this process's and `num_prompts` counts the groups
    of all processes: the batch is global, its rows laid out over the mesh's batch axes
    (`sharding.global_batch`), each process feeding its own.
    """
    g = groups.rewards.shape[1]
    global_rows = _global_rows("assemble_batch", num_prompts, g)
    if global_rows is None:
        place = jnp.asarray
    elif mesh_rules is None:
        raise ValueError("assemble_batch: a multi-process run needs mesh_rules (a mesh over all "
                         "processes' devices)")
    else:
        def place(x, dtype=None):
            return global_batch(np.asarray(x, dtype), mesh_rules, global_rows)
    n, p = groups.prompt_tokens.shape
    t = p + groups.tokens.shape[1]
    pos = np.arange(t)[None]
    plen = groups.prompt_lengths[:, None]
    completion_pos = (pos >= plen) & (pos < plen + groups.lengths[:, None])
    from_prompt = np.take_along_axis(groups.prompt_tokens, np.minimum(pos, p - 1).repeat(n, 0), 1)
    from_completion = np.take_along_axis(groups.tokens, np.clip(pos - plen, 0, groups.tokens.shape[1] - 1), 1)
    tokens = np.where(pos < plen, from_prompt, np.where(completion_pos, from_completion, 0)).astype(np.int32)
    advantages = grpo.group_advantages(jnp.asarray(groups.rewards), grpo_cfg.scale_rewards,
                                       grpo_cfg.advantage_eps, grpo_cfg.std_ddof).reshape(-1)
    # every process must trace the same program: all share prompts or none does
    unshared = np.int32(share_prompts and not _groups_share_prompts(groups, g))
    shared_prompts = share_prompts and int(process_sum(unshared)) == 0
    experts = None
    if routing_replay and groups.experts is not None:
        experts = place(groups.experts[:, :, :t])
    batch = RolloutBatch(
        tokens=place(tokens), mask=place(completion_pos[:, 1:], jnp.float32),
        advantages=place(advantages, jnp.float32), rewards=place(groups.rewards.reshape(-1)),
        lengths=place(groups.lengths, jnp.int32), truncated=place(groups.truncated),
        experts=experts, completion_width=groups.tokens.shape[1],
        group_size=g if shared_prompts else None)
    positions = batch.logprob_positions()
    if grpo_cfg.num_iterations > 1:
        batch.old_logp = sequence_logprobs(params, batch.tokens, cfg, grpo_cfg.temperature, experts,
                                           mesh_rules, positions, batch.group_size)
    if grpo_cfg.beta > 0:
        if ref_params is None:
            raise ValueError(f"GRPOConfig.beta={grpo_cfg.beta} > 0 needs ref_params")
        batch.ref_logp = sequence_logprobs(ref_params, batch.tokens, cfg, grpo_cfg.temperature, None,
                                           mesh_rules, positions, batch.group_size)
    return batch
