"""Rollouts: prompts x G -> `sample` -> decode -> rewards -> advantages -> a `RolloutBatch`.

Every batch has fixed shapes (`[n, P + max_new_tokens]`), so the train step compiles
once. DAPO's dynamic sampling drops groups whose rewards are all equal and refills the
batch from further prompts. With routing replay the experts each token was routed to
during the rollout travel in the batch, so the training forward uses the same experts.
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
from r1jax.losses import entropy as token_entropy
from r1jax.losses import token_logprobs
from r1jax.model.transformer import Params, forward
from r1jax.rl import grpo
from r1jax.sampling import FINISHED_LENGTH, SamplingConfig, sample
from r1jax.sharding import MeshRules


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


def generate_groups(params: Params, cfg: ModelConfig, examples: list, *, tokenizer,
                    prompt_fn: Callable[[dict], str], reward_fn: Callable[..., float],
                    num_generations: int, scfg: SamplingConfig, key: jax.Array, prompt_len: int,
                    mesh_rules: Optional[MeshRules] = None) -> Groups:
    """Samples G completions per example and scores them with `reward_fn(completion, **example)`."""
    prompts = [prompt_fn(ex) for ex in examples]
    tokens, lengths = tokenize_prompts(tokenizer, prompts, prompt_len)
    tokens = np.repeat(np.asarray(tokens), num_generations, axis=0)
    lengths = np.repeat(np.asarray(lengths), num_generations, axis=0)
    samples = sample(params, cfg, tokens, lengths, key, scfg, mesh_rules=mesh_rules)
    out_tokens = np.asarray(samples.tokens)
    out_lengths = np.asarray(samples.lengths)
    truncated = np.asarray(samples.finish_reason) == FINISHED_LENGTH
    completions = [tokenizer.decode(out_tokens[i, :out_lengths[i]]) for i in range(len(out_tokens))]
    rewards = np.array([float(reward_fn(c, **examples[i // num_generations]))
                        for i, c in enumerate(completions)], np.float32)
    experts = None if samples.experts is None else np.asarray(samples.experts)
    return Groups(list(examples), completions, tokens, lengths, out_tokens, out_lengths, truncated,
                  rewards.reshape(len(examples), num_generations), experts)


def collect_groups(generate: Callable[[list, jax.Array], Groups], next_examples: Iterator[list],
                   key: jax.Array, num_prompts: int, dynamic_sampling: bool,
                   max_rounds: int = 8) -> tuple[Groups, dict]:
    """One round of generation, or (DAPO dynamic sampling) as many rounds as it takes to fill
    `num_prompts` groups whose rewards are not all equal (at most `max_rounds`; if that is
    not enough, the batch is completed with the remaining groups so shapes stay fixed)."""
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
        if sum(len(k.examples) for k in kept) >= num_prompts or rounds >= max_rounds:
            break
        groups = generate(next(next_examples), jax.random.fold_in(key, rounds))
    useful = Groups.concat(kept + spare)  # groups with signal first
    filled = sum(len(k.examples) for k in kept)
    return useful.select(np.arange(num_prompts)), {
        "rounds": rounds, "kept_groups_frac": min(filled, num_prompts) / num_prompts,
        "signal_groups_frac": filled / seen}


def policy_logprobs(params: Params, tokens_nT: jax.Array, cfg: ModelConfig, temperature: float = 1.0,
                    experts: Optional[jax.Array] = None, mesh_rules: Optional[MeshRules] = None,
                    with_entropy: bool = False, token_mask: Optional[jax.Array] = None):
    """(log pi(token t+1 | tokens <= t) [n, T-1] float32, entropy [n, T-1] or None, aux).

    The trainer's log-probs; `experts` [n, l_moe, T, k] replays a recorded routing;
    `token_mask` [n, T] marks real tokens (for the MoE load statistics).
    """
    routing = None if experts is None else {"moe": jnp.moveaxis(experts, 0, 1)}
    out = forward(params, tokens_nT, cfg, routing=routing, with_mtp=False, token_mask=token_mask,
                  mesh_rules=mesh_rules)
    logits = out.logits[:, :-1]
    logp = token_logprobs(logits, tokens_nT[:, 1:], temperature)
    return logp, (token_entropy(logits, temperature) if with_entropy else None), out.aux


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "mesh_rules"))
def sequence_logprobs(params: Params, tokens_nT: jax.Array, cfg: ModelConfig, temperature: float = 1.0,
                      experts: Optional[jax.Array] = None, mesh_rules: Optional[MeshRules] = None):
    """Jitted `policy_logprobs` without entropy: [n, T-1] float32."""
    return policy_logprobs(params, tokens_nT, cfg, temperature, experts, mesh_rules)[0]


def assemble_batch(groups: Groups, cfg: ModelConfig, grpo_cfg: grpo.GRPOConfig, *, params: Params,
                   ref_params: Optional[Params] = None, mesh_rules: Optional[MeshRules] = None,
                   routing_replay: bool = False) -> RolloutBatch:
    """Lays prompt + completion out left-aligned, computes advantages, and the old / reference
    log-probs that the objective needs (none with mu = 1 and beta = 0)."""
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
    experts = None
    if routing_replay and groups.experts is not None:
        experts = jnp.asarray(groups.experts[:, :, :t])
    tokens_j = jnp.asarray(tokens)
    old_logp = ref_logp = None
    if grpo_cfg.num_iterations > 1:
        old_logp = sequence_logprobs(params, tokens_j, cfg, grpo_cfg.temperature, experts, mesh_rules)
    if grpo_cfg.beta > 0:
        if ref_params is None:
            raise ValueError(f"GRPOConfig.beta={grpo_cfg.beta} > 0 needs ref_params")
        ref_logp = sequence_logprobs(ref_params, tokens_j, cfg, grpo_cfg.temperature, None, mesh_rules)
    return RolloutBatch(
        tokens=tokens_j, mask=jnp.asarray(completion_pos[:, 1:], jnp.float32),
        advantages=jnp.asarray(advantages, jnp.float32), rewards=jnp.asarray(groups.rewards.reshape(-1)),
        lengths=jnp.asarray(groups.lengths, jnp.int32), truncated=jnp.asarray(groups.truncated),
        old_logp=old_logp, ref_logp=ref_logp, experts=experts)
