"""The GRPO train step: a pure, jitted, sharded `train_step(state, batch) -> (state, metrics)`.

The policy log-probs come from `forward` + `losses.token_logprobs`, the same function the
sampler uses. With mu = 1 (`GRPOConfig.num_iterations == 1`) the batch carries no old
log-probs: they are the current ones under `stop_gradient`, so the ratio is exactly 1 and
the gradient is the plain policy gradient. MoE routing can be replayed from the rollout
(`batch.experts`), and the auxiliary-loss-free router bias update runs after each step
when `router_bias_rate > 0`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from r1jax.configs import ModelConfig
from r1jax.model.moe import update_router_bias
from r1jax.model.transformer import Params
from r1jax.rl import grpo
from r1jax.rl.rollout import RolloutBatch, policy_logprobs
from r1jax.sharding import MeshRules


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a training run needs to continue: a checkpoint saves exactly this."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array  # [] int32
    key: jax.Array  # typed PRNG key


def is_router_bias(path, _leaf) -> bool:
    return any(getattr(k, "name", None) == "router_bias" for k in path)


def _decay_mask(params):
    """Weight decay on matrices only (not norms, biases, or the router correction bias)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and not is_router_bias(path, x), params)


def make_optimizer(learning_rate: float | optax.Schedule, weight_decay: float = 0.0,
                   max_grad_norm: Optional[float] = 1.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; the router correction bias is never touched by it
    (it is updated by the balancing rule, not by gradients)."""
    parts = []
    if max_grad_norm:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    frozen = lambda params: jax.tree_util.tree_map_with_path(is_router_bias, params)  # noqa: E731
    parts.append(optax.masked(optax.set_to_zero(), frozen))
    return optax.chain(*parts)


def init_train_state(params: Params, optimizer: optax.GradientTransformation,
                     key: jax.Array) -> TrainState:
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                      key=key)


def grpo_loss(params: Params, batch: RolloutBatch, cfg: ModelConfig, grpo_cfg: grpo.GRPOConfig,
              mesh_rules: Optional[MeshRules] = None):
    """(loss, (metrics, aux)) for one rollout batch (or micro-batch)."""
    logp, ent, aux = policy_logprobs(params, batch.tokens, cfg, grpo_cfg.temperature, batch.experts,
                                     mesh_rules, with_entropy=True)
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

    def micro_grads(params, batch):
        (loss, (metrics, aux)), grads = jax.value_and_grad(grpo_loss, has_aux=True)(
            params, batch, cfg, grpo_cfg, mesh_rules)
        load = aux.get("expert_load")
        return grads, loss, metrics, load

    def step(state: TrainState, batch: RolloutBatch):
        if grad_accum_steps == 1:
            grads, loss, metrics, load = micro_grads(state.params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

            def body(acc, mb):
                g, l, m, ld = micro_grads(state.params, mb)
                return jax.tree.map(jnp.add, acc, (g, l, m, ld)), None

            zero = jax.eval_shape(micro_grads, state.params, jax.tree.map(lambda x: x[0], micro))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (grads, loss, metrics, load), _ = jax.lax.scan(body, zero, micro)
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            loss = loss / grad_accum_steps
            metrics = {k: v / grad_accum_steps for k, v in metrics.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if router_bias_rate and load is not None and params.moe_layers is not None:
            moe = params.moe_layers.mlp
            new_bias = update_router_bias(moe.router_bias, load, router_bias_rate)
            params = dataclasses.replace(params, moe_layers=dataclasses.replace(
                params.moe_layers, mlp=dataclasses.replace(moe, router_bias=new_bias)))
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if load is not None:
            metrics["expert_load"] = load
            metrics["expert_load_max_over_mean"] = jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key)
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else (),
                   out_shardings=(state_shardings, None) if state_shardings is not None else None)


def state_shardings(optimizer: optax.GradientTransformation, opt_state, param_shardings: Params,
                    mesh_rules: MeshRules) -> TrainState:
    """Shardings for a TrainState: optimizer moments follow their parameters; counters and
    the key are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt, step=replicated, key=replicated)
