"""Every sharding strategy (`r1jax.sharding.RULE_PRESETS`) on 8 simulated devices gives the
single-device results: forward logits, one GRPO train step (loss, updated parameters and
optimizer state, in the rules' layout), and greedy sampling.

`load_hf(..., mesh=, rules=)` and `init_params(..., mesh=, rules=)` are checked for every
strategy without compiling; the numerical comparisons use a Qwen2-shaped fixture and a
one-stack DeepSeek-V3-shaped MoE (MLA, 8 routed experts, a shared expert, balance loss),
each strategy compiling its three functions once.
"""
import functools

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

from model_fixtures import FIXTURES, random_params

FIXTURE = {"moe": "deepseek_v3_yarn", "dense": "qwen2_tied"}
# (rules preset, mesh, model): axis sizes divide the models' dimensions (qwen2_tied has 2
# key/value heads, so tensor <= 2; the MoE has 8 routed experts and 4 heads).
CASES = [
    ("dp", "data=8", "dense"),
    ("fsdp", "fsdp=8", "moe"),
    ("fsdp_tp", "fsdp=4,tensor=2", "dense"),
    ("fsdp_ep", "fsdp=2,expert=4", "moe"),  # expert parallel: 2 experts per device
    ("fsdp_tp_ep", "fsdp=2,tensor=2,expert=2", "moe"),
]
IDS = [c[0] for c in CASES]

N, T = 8, 12  # GRPO rows (4 prompts x G=2) and sequence length
# beta > 0 against a fixed reference: with mu = 1 the surrogate's value does not depend on
# the parameters (ratio 1), the KL term does.
GCFG = grpo.GRPOConfig(num_generations=2, beta=0.04, num_iterations=1, max_completion_length=8)
# eps = 1e-3 keeps Adam's first step (g / (|g| + eps)) a smooth function of the gradient,
# so float32 summation-order differences stay small in the parameters.
OPTIMIZER = training.make_optimizer(1e-3, weight_decay=0.01, eps=1e-3)
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
                        truncated=jnp.zeros(N, bool),
                        ref_logp=jnp.asarray(-5.5 + 0.5 * rng.standard_normal((N, T - 1)),
                                             jnp.float32))


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


@functools.lru_cache(maxsize=None)
def model(name: str):
    """(cfg, single-device params). The MoE: no dense stack and no MTP, so the train step
    compiles one layer stack (compile time, not depth, is what costs here)."""
    if name == "dense":
        return r1jax.load_hf(FIXTURES / FIXTURE["dense"])
    cfg = r1jax.configs.tiny_moe(first_k_dense_replace=0, num_hidden_layers=2,
                                 num_nextn_predict_layers=0)
    return cfg, random_params(cfg, 0, with_mtp=False)


@functools.lru_cache(maxsize=None)
def single(name: str):
    cfg, params = model(name)
    return _run(cfg, jax.tree.map(jnp.copy, params))


def _full_spec(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


@pytest.mark.parametrize("preset, mesh_spec, name", CASES, ids=IDS)
def test_load_and_init_on_every_strategy(preset, mesh_spec, name):
    """`load_hf` places each weight in the rules' layout, and `init_params` would create
    it there (lowered only: compiling a random init costs seconds per mesh; test_model
    compiles one)."""
    mesh, rules = r1jax.make_mesh(mesh_spec), shd.RULE_PRESETS[preset]()
    cfg, params = r1jax.load_hf(FIXTURES / FIXTURE[name], mesh=mesh, rules=rules)
    expected = jax.tree.leaves(transformer.param_shardings(cfg, mesh, rules, with_mtp=False))
    assert [x.sharding for x in jax.tree.leaves(params)] == expected
    assert any(not s.is_fully_replicated for s in expected) or preset == "dp"
    init = transformer._initializer(cfg, False, r1jax.MeshRules(mesh, rules))
    init = init.lower(jax.random.key(0))
    assert [x.sharding for x in jax.tree.leaves(init.out_info)] == expected


def test_fsdp_presets_shard_the_mla_latent_weights():
    """q_b [q_lora, heads, head_dim] and k_b / v_b [kv_lora, ...] have no `embed` dimension:
    the FSDP presets split their latent rank over `fsdp` (a fallback rule, used only where
    `fsdp` is free in the array and divides the dimension)."""
    cfg = r1jax.configs.tiny_moe()
    mesh = r1jax.make_mesh("fsdp=8")
    for preset in ("fsdp", "fsdp_tp", "fsdp_ep", "fsdp_tp_ep"):
        attn = r1jax.abstract_params(cfg, mesh, shd.RULE_PRESETS[preset]()).moe_layers.attn
        assert attn.q_b.sharding.spec[1] == "fsdp" and attn.k_b.sharding.spec[1] == "fsdp"
        assert tuple(attn.q_a.sharding.spec)[1:] == ("fsdp", None)  # embed took fsdp: no fallback
    rules = shd.fsdp_rules()
    sizes = {"data": 1, "fsdp": 16, "tensor": 1, "expert": 1}
    assert rules.spec(("kv_lora",), (24,), sizes) == P(None)  # 24 % 16: left whole
    assert rules.spec(("kv_lora",), (32,), sizes) == P("fsdp")


@pytest.mark.parametrize("preset, mesh_spec, name", CASES, ids=IDS)
def test_strategy_equals_single_device(preset, mesh_spec, name):
    logits, (state, metrics), samples = single(name)
    cfg, params = model(name)
    mesh = r1jax.make_mesh(mesh_spec)
    rules = shd.RULE_PRESETS[preset]()
    mesh_rules = r1jax.MeshRules(mesh, rules)
    expected = transformer.param_shardings(cfg, mesh, rules, with_mtp=False)
    params = jax.device_put(jax.tree.map(jnp.copy, params), expected)  # the step donates them

    got_logits, (got_state, got_metrics), got_samples = _run(cfg, params, mesh_rules)

    # forward
    assert len(got_logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(logits), atol=1e-5, rtol=0)

    # one GRPO step
    assert abs(float(metrics["loss"])) > 1e-3
    for name in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(float(got_metrics[name]), float(metrics[name]), rtol=1e-5,
                                   err_msg=name)
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
