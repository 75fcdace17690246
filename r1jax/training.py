"""Training state, optimizer, and the language-model train step (pretraining and SFT).

`TrainState` is everything a run needs to continue; a checkpoint saves exactly it.
`apply_gradients` is the one place where gradients, the optimizer and the
auxiliary-loss-free router-bias update meet; the GRPO step (`r1jax.rl.train`) and the
LM step below both use it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax.configs import ModelConfig
from r1jax.losses import next_token_loss
from r1jax.model.moe import update_router_bias
from r1jax.model.mtp import mtp_loss
from r1jax.model.transformer import Params, forward
from r1jax.sharding import MeshRules


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Params
    opt_state: optax.OptState
    step: jax.Array  # [] int32
    key: jax.Array  # typed PRNG key


def is_router_bias(path, _leaf=None) -> bool:
    return any(getattr(k, "name", None) == "router_bias" for k in path)


def _decay_mask(params):
    """Weight decay on matrices only (not norms, biases, or the router correction bias)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: x.ndim >= 2 and not is_router_bias(path), params)


def make_optimizer(learning_rate, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. The router correction bias is left alone: it is
    updated by the balancing rule, not by gradients."""
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask))
    parts.append(optax.masked(optax.set_to_zero(),
                              lambda params: jax.tree_util.tree_map_with_path(is_router_bias, params)))
    return optax.chain(*parts)


def init_train_state(params: Params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state around `params` (kept as they are), placed as the jitted step's outputs
    will be, so step 2 reuses step 1's executable. One device: everything committed to it.
    On a mesh: optimizer moments like their parameters, counters and the key replicated,
    built inside `jit` (`device_put` cannot place a key across processes)."""
    leaf = jax.tree.leaves(params)[0]
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        device = sharding if sharding is not None else jax.devices()[0]
        state = TrainState(params=params, opt_state=optimizer.init(params),
                           step=jnp.zeros((), jnp.int32), key=key)
        return jax.device_put(state, device)
    shardings = state_shardings(optimizer, jax.eval_shape(optimizer.init, params),
                                jax.tree.map(lambda x: x.sharding, params), MeshRules(sharding.mesh))
    key_data, impl = np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)
    opt_state, step, key = jax.jit(
        lambda p: (optimizer.init(p), jnp.zeros((), jnp.int32),
                   jax.random.wrap_key_data(key_data, impl=impl)),
        out_shardings=(shardings.opt_state, shardings.step, shardings.key))(params)
    return TrainState(params=params, opt_state=opt_state, step=step, key=key)


def state_shardings(optimizer: optax.GradientTransformation, opt_state, param_shardings: Params,
                    mesh_rules: MeshRules) -> TrainState:
    """Shardings of a TrainState: optimizer moments follow their parameters; counters and
    the key are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh_rules.mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt, step=replicated, key=replicated)


def accumulate_gradients(grad_fn: Callable, params: Params, batch, steps: int):
    """Mean of `grad_fn(params, micro_batch) -> (grads, loss, metrics, extra)` over `steps`
    equal splits of the batch's leading axis (summed `extra`, e.g. expert loads)."""
    if steps == 1:
        return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: x.reshape(steps, -1, *x.shape[1:]), batch)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, mb):
        return jax.tree.map(jnp.add, acc, grad_fn(params, mb)), None

    (grads, loss, metrics, extra), _ = jax.lax.scan(body, zero, micro)
    mean = lambda t: jax.tree.map(lambda x: x / steps, t)  # noqa: E731
    return mean(grads), loss / steps, mean(metrics), extra


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation,
                    expert_load: Optional[jax.Array] = None, router_bias_rate: float = 0.0):
    """Optimizer step, then b_i += gamma * sign(mean load - load_i) on the router biases.

    Returns (new state, metrics with grad_norm and expert-load statistics)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"grad_norm": optax.global_norm(grads)}
    if expert_load is not None:
        if router_bias_rate and params.moe_layers is not None:
            moe = params.moe_layers.mlp
            bias = update_router_bias(moe.router_bias, expert_load, router_bias_rate)
            params = dataclasses.replace(params, moe_layers=dataclasses.replace(
                params.moe_layers, mlp=dataclasses.replace(moe, router_bias=bias)))
        load = expert_load.astype(jnp.float32)
        metrics["expert_load"] = expert_load
        metrics["expert_load_max_over_mean"] = jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1, key=state.key), metrics


def lm_loss(params: Params, tokens_bt: jax.Array, mask_bt: jax.Array, cfg: ModelConfig,
            mtp_weight: float = 0.3, mesh_rules: Optional[MeshRules] = None):
    """Next-token cross-entropy on masked target tokens (+ MTP loss, + balance loss).

    mask [b, t]: 1 where token t is a training target (e.g. completion tokens in SFT).
    Returns (loss, (metrics, expert load [l, e] or None)).
    """
    out = forward(params, tokens_bt, cfg, token_mask=mask_bt > 0, mesh_rules=mesh_rules)
    ce = next_token_loss(out.logits, tokens_bt, mask_bt)
    loss, metrics = ce, {"ce": ce}
    if out.mtp_logits is not None and mtp_weight:
        m = mtp_loss(out.mtp_logits, tokens_bt, mask_bt)
        loss, metrics["mtp_loss"] = loss + mtp_weight * m, m
    if "balance_loss" in out.aux and cfg.aux_loss_alpha:
        loss = loss + out.aux["balance_loss"]
        metrics["balance_loss"] = out.aux["balance_loss"]
    return loss, (metrics, out.aux.get("expert_load"))


def make_lm_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *,
                       mtp_weight: float = 0.3, router_bias_rate: float = 0.0,
                       grad_accum_steps: int = 1, mesh_rules: Optional[MeshRules] = None,
                       state_shardings: Optional[TrainState] = None) -> Callable:
    """Jitted `step(state, tokens [b, t], mask [b, t]) -> (state, metrics)`."""

    def grad_fn(params, batch):
        tokens, mask = batch
        (loss, (metrics, load)), grads = jax.value_and_grad(lm_loss, has_aux=True)(
            params, tokens, mask, cfg, mtp_weight, mesh_rules)
        return grads, loss, metrics, load

    def step(state: TrainState, tokens, mask):
        grads, loss, metrics, load = accumulate_gradients(grad_fn, state.params, (tokens, mask),
                                                          grad_accum_steps)
        state, extra = apply_gradients(state, grads, optimizer, load, router_bias_rate)
        return state, dict(metrics, loss=loss, **extra)

    out = (state_shardings, None) if state_shardings is not None else None
    return jax.jit(step, donate_argnums=(0,), out_shardings=out)
