"""Every sharding strategy (`r1jax.sharding.RULE_PRESETS`) on 8 simulated devices gives the
single-device results: forward logits, one GRPO train step (loss, updated parameters and
optimizer state, in the rules' layout), and greedy sampling.

Parameters come from the Hugging Face fixtures through `load_hf(..., mesh=, rules=)`, so
loading onto every mesh is tested too; each strategy compiles its three functions once.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import r1jax
from r1jax import sharding as shd
from r1jax import training
from r1jax.model import transformer
from r1jax.rl import grpo
from r1jax.rl.rollout import RolloutBatch
from r1jax.rl.train import make_train_step
from r1jax.sampling import SamplingConfig, sample

from model_fixtures import FIXTURES

MODELS = {"moe": "deepseek_v3_yarn", "dense": "qwen2_tied"}
# (rules preset, mesh, model): axis sizes divide the models' dimensions (qwen2_tied has 2
# key/value heads, so tensor <= 2; deepseek_v3_yarn has 8 routed experts and 4 heads).
CASES = [
    ("dp", "data=8", "dense"),
    ("fsdp", "fsdp=8", "moe"),
    ("fsdp_tp", "fsdp=4,tensor=2", "dense"),
    ("fsdp_ep", "fsdp=2,expert=4", "moe"),  # expert parallel: 2 experts per device
    ("fsdp_tp_ep", "fsdp=2,tensor=2,expert=2", "moe"),
]
N, T = 8, 12  # GRPO rows (4 prompts x G=2) and sequence length
GCFG = grpo.GRPOConfig(num_generations=2, beta=0.0, num_iterations=1, max_completion_length=8)
# eps = 1e-3 keeps Adam's first step (g / (|g| + eps)) a smooth function of the gradient,
# so float32 summation-order differences stay small in the parameters.
OPTIMIZER = training.make_optimizer(1e-2, weight_decay=0.01, eps=1e-3)
GREEDY = SamplingConfig(max_new_tokens=4, temperature=0.0)


def _batch(cfg) -> RolloutBatch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.vocab_size, (N, T)).astype(np.int32)
    lengths = rng.integers(3, 8, N)
    pos = np.arange(1, T)[None]
    mask = ((pos >= 4) & (pos < 4 + lengths[:, None])).astype(np.float32)
    rewards = rng.random(N).astype(np.float32)
    adv = grpo.group_advantages(jnp.asarray(rewards.reshape(-1, 2)), True).reshape(-1)
    return RolloutBatch(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), advantages=adv,
                        rewards=jnp.asarray(rewards), lengths=jnp.asarray(lengths, jnp.int32),
                        truncated=jnp.zeros(N, bool))


def _prompts():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.integers(2, 256, (N, 6)), jnp.int32),
            jnp.asarray(rng.integers(2, 7, N), jnp.int32))


def _run(cfg, params, mesh_rules=None):
    """(logits, (state after one GRPO step, metrics), greedy samples)."""
    tokens = _batch(cfg).tokens
    batch, (prompt, lengths) = _batch(cfg), _prompts()
    state = training.init_train_state(params, OPTIMIZER, jax.random.key(0))
    shardings = None
    if mesh_rules is not None:
        rows = NamedSharding(mesh_rules.mesh, mesh_rules.rules.spec(("batch",)))
        tokens, batch, prompt, lengths = jax.device_put((tokens, batch, prompt, lengths), rows)
        pshard = jax.tree.map(lambda x: x.sharding, params)
        shardings = training.state_shardings(OPTIMIZER, state.opt_state, pshard, mesh_rules)
        state = jax.device_put(state, shardings)
    logits = r1jax.forward(params, tokens, cfg, mesh_rules=mesh_rules).logits
    samples = sample(params, cfg, prompt, lengths, jax.random.key(0), GREEDY, mesh_rules=mesh_rules)
    step = make_train_step(cfg, GCFG, OPTIMIZER, router_bias_rate=1e-3, mesh_rules=mesh_rules,
                           state_shardings=shardings)
    stepped = step(state, batch)  # donates `params` (the state's buffers)
    return logits, stepped, samples


_SINGLE = {}


def single(model: str):
    if model not in _SINGLE:
        cfg, params = r1jax.load_hf(FIXTURES / MODELS[model])
        _SINGLE[model] = (cfg, _run(cfg, params))
    return _SINGLE[model]


def _full_spec(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


@pytest.mark.parametrize("preset, mesh_spec, model", CASES, ids=[c[0] for c in CASES])
def test_strategy_equals_single_device(preset, mesh_spec, model):
    cfg, (logits, (state, metrics), samples) = single(model)
    mesh = r1jax.make_mesh(mesh_spec)
    rules = shd.RULE_PRESETS[preset]()
    mesh_rules = r1jax.MeshRules(mesh, rules)
    _, params = r1jax.load_hf(FIXTURES / MODELS[model], mesh=mesh, rules=rules)
    expected = transformer.param_shardings(cfg, mesh, rules, with_mtp=False)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.sharding == want
    # init_params builds its arrays in the same layout (lowered only: compiling a random
    # init costs seconds per mesh; test_model runs one)
    init = transformer._initializer(cfg, False, mesh_rules).lower(jax.random.key(0))
    assert [x.sharding for x in jax.tree.leaves(init.out_info)] == jax.tree.leaves(expected)

    got_logits, (got_state, got_metrics), got_samples = _run(cfg, params, mesh_rules)

    # forward
    assert len(got_logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(logits), atol=1e-5, rtol=0)

    # one GRPO step
    np.testing.assert_allclose(float(got_metrics["loss"]), float(metrics["loss"]), rtol=1e-5, atol=1e-7)
    if "expert_load" in metrics:
        np.testing.assert_array_equal(np.asarray(got_metrics["expert_load"]),
                                      np.asarray(metrics["expert_load"]))
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(got_state.params),
                               jax.tree.leaves(got_state.params), jax.tree.leaves(state.params)):
        got, want = np.asarray(got), np.asarray(want)
        err = np.max(np.abs(got - want) / (1e-2 + np.abs(want)))
        assert err < 1e-5, f"{preset}: {jax.tree_util.keystr(path[0])} differs by {err:.3g}"
    # no parameter (nor its Adam moments) silently replicated: the rules' spec, leaf by leaf
    for tree in (got_state.params, got_state.opt_state[1][0].mu, got_state.opt_state[1][0].nu):
        for path, leaf, want in zip(jax.tree_util.tree_leaves_with_path(tree),
                                    jax.tree.leaves(tree), jax.tree.leaves(expected)):
            assert _full_spec(leaf.sharding.spec, leaf.ndim) == _full_spec(want.spec, leaf.ndim), \
                f"{preset}: {jax.tree_util.keystr(path[0])} is laid out as {leaf.sharding.spec}, " \
                f"the rules say {want.spec}"

    # greedy sampling
    np.testing.assert_array_equal(np.asarray(got_samples.tokens), np.asarray(samples.tokens))
    np.testing.assert_allclose(np.asarray(got_samples.logprobs), np.asarray(samples.logprobs),
                               atol=1e-5, rtol=0)
