"""The GRPO train step: a pure, jitted, sharded `train_step(state, batch) -> (state, metrics)`.

The policy log-probs come from `forward` + `losses.linear_logprobs`, whose values are
`losses.token_logprobs`, the function the sampler uses (its gradient is written by hand).
With mu = 1 (`GRPOConfig.num_iterations == 1`) the batch carries no old log-probs: they
are the current ones under `stop_gradient`, so the ratio is exactly 1 and the gradient is
the plain policy gradient. MoE routing can be replayed from the rollout
(`batch.experts`), and the auxiliary-loss-free router bias update runs after each step
when `router_bias_rate > 0`.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from r1jax.configs import ModelConfig
from r1jax.model.transformer import Params
from r1jax.rl import grpo
from r1jax.rl.rollout import RolloutBatch, policy_logprobs
from r1jax.training import TrainState, accumulate_gradients, apply_gradients
from r1jax.sharding import MeshRules


def grpo_loss(params: Params, batch: RolloutBatch, cfg: ModelConfig, grpo_cfg: grpo.GRPOConfig,
              mesh_rules: Optional[MeshRules] = None):
    """(loss, (metrics, aux)) for one rollout batch (or micro-batch)."""
    # real tokens: everything up to the last completion token (prompts come first)
    t = batch.tokens.shape[1]
    last = jnp.max(jnp.arange(1, t) * (batch.mask > 0), axis=1)
    token_mask = jnp.arange(t)[None, :] <= last[:, None]
    logp, ent, aux = policy_logprobs(params, batch.tokens, cfg, grpo_cfg.temperature, batch.experts,
                                     mesh_rules, with_entropy=True, token_mask=token_mask,
                                     positions=batch.logprob_positions(), group_size=batch.group_size)
    old = batch.old_logp if batch.old_logp is not None else jax.lax.stop_gradient(logp)
    loss, metrics = grpo.policy_loss(logp, old, batch.ref_logp, batch.advantages, batch.mask,
                                     grpo_cfg, entropy=jax.lax.stop_gradient(ent))
    if "balance_loss" in aux and cfg.aux_loss_alpha:
        loss = loss + aux["balance_loss"]
        metrics["balance_loss"] = aux["balance_loss"]
    return loss, (metrics, aux)


def make_train_step(cfg: ModelConfig, grpo_cfg: grpo.GRPOConfig,
                    optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    router_bias_rate: float = 0.0, mesh_rules: Optional[MeshRules] = None,
                    state_shardings=None, donate: bool = True) -> Callable:
    """Builds the jitted `train_step(state, batch) -> (state, metrics)`.

    grad_accum_steps: split the batch's rows into this many micro-batches, summing their
      gradients (rows must divide evenly). router_bias_rate: gamma of the bias update,
      b_i += gamma * sign(mean load - load_i), from this step's expert loads (0 = off).
    state_shardings: output shardings of the state (e.g. from `state_shardings(...)`), so
      parameters and optimizer state keep the rules' layout.
    """

    def grad_fn(params, batch):
        (loss, (metrics, aux)), grads = jax.value_and_grad(grpo_loss, has_aux=True)(
            params, batch, cfg, grpo_cfg, mesh_rules)
        return grads, loss, metrics, aux.get("expert_load")

    def step(state: TrainState, batch: RolloutBatch):
        grads, loss, metrics, load = accumulate_gradients(grad_fn, state.params, batch, grad_accum_steps)
        state, extra = apply_gradients(state, grads, optimizer, load, router_bias_rate)
        return state, dict(metrics, loss=loss, **extra)

    out = (state_shardings, None) if state_shardings is not None else None
    return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out)
