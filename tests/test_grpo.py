"""Tests for the GRPO objective (r1jax.rl.grpo): values by hand, gradients, config checks."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.rl import grpo
from r1jax.rl.grpo import GRPOConfig

# Shared small batch: n = 2 completions, T = 3 tokens; the last token of row 0 is padding.
# Ratios are chosen so that every clip case appears once with eps_low = 0.2, eps_high = 0.28.
RATIOS = np.array([[1.1, 1.3, 0.7], [0.9, 0.75, 1.5]], np.float32)
MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
ADV = np.array([1.0, -2.0], np.float32)
LOGP = np.array([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], np.float32)
OLD_LOGP = LOGP - np.log(RATIOS)
# Per-token objective min(r A, clip(r, 0.8, 1.28) A) on completion tokens:
#   row 0 (A = 1):  r=1.1 -> 1.1;    r=1.3 -> 1.28 (upper clip)
#   row 1 (A = -2): r=0.9 -> -1.8;   r=0.75 -> 0.8 * -2 = -1.6 (lower clip);   r=1.5 -> -3.0
OBJ_ROW0 = [1.1, 1.28]
OBJ_ROW1 = [-1.8, -1.6, -3.0]


def cfg_(**kw):
    base = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.0, num_generations=2)
    base.update(kw)
    return GRPOConfig(**base)


def loss_of(cfg, logp=LOGP, old=OLD_LOGP, ref=None, adv=ADV, mask=MASK, **kw):
    return grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), ref, jnp.asarray(adv),
                            jnp.asarray(mask), cfg, **kw)


# ----------------------------------------------------------------------------- advantages


def test_advantages_unbiased_std():
    rewards = jnp.array([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 4.0, 6.0]])
    # row 0: mean 0.25, centred [0.75, -0.25, -0.25, -0.25], sum sq 0.75, std(ddof=1) = 0.5
    # row 1: mean 4, centred [-2, 0, 0, 2], sum sq 8, std(ddof=1) = sqrt(8/3)
    s1 = math.sqrt(8 / 3)
    expected = [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001],
                [-2 / (s1 + 1e-4), 0.0, 0.0, 2 / (s1 + 1e-4)]]
    got = grpo.group_advantages(rewards, scale_by_std=True, eps=1e-4, std_ddof=1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_advantages_population_std():
    rewards = jnp.array([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 4.0, 6.0]])
    # population std: row 0 sqrt(0.75 / 4), row 1 sqrt(8 / 4)
    s0, s1 = math.sqrt(0.1875), math.sqrt(2.0)
    expected = [[0.75 / (s0 + 1e-4), -0.25 / (s0 + 1e-4), -0.25 / (s0 + 1e-4), -0.25 / (s0 + 1e-4)],
                [-2 / (s1 + 1e-4), 0.0, 0.0, 2 / (s1 + 1e-4)]]
    got = grpo.group_advantages(rewards, scale_by_std=True, eps=1e-4, std_ddof=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_advantages_without_std_and_equal_group():
    rewards = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]])
    got = grpo.group_advantages(rewards, scale_by_std=False)
    np.testing.assert_allclose(got[0], [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.zeros(4))
    # all-equal group is exactly zero with std scaling too (0.3 is not exact in float32)
    np.testing.assert_array_equal(grpo.group_advantages(rewards)[1], np.zeros(4))


def test_advantages_reject_bad_shape():
    with pytest.raises(ValueError, match="rewards_bg"):
        grpo.group_advantages(jnp.ones((3, 1)), std_ddof=1)


# ----------------------------------------------------------------------------- KL


def test_kl_values_by_hand():
    logp, ref = jnp.array([-1.0]), jnp.array([-1.5])
    np.testing.assert_allclose(grpo.kl_divergence(logp, ref, "k1"), [0.5], rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_divergence(logp, ref, "k2"), [0.125], rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_divergence(logp, ref, "k3"),
                               [math.exp(-0.5) + 0.5 - 1], rtol=1e-6)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_zero_when_policy_is_reference(est):
    logp = jax.random.normal(jax.random.key(0), (4, 7)) - 2.0
    np.testing.assert_array_equal(grpo.kl_divergence(logp, logp, est), np.zeros((4, 7)))


def test_k3_nonnegative():
    k1, k2 = jax.random.split(jax.random.key(1))
    logp = 3.0 * jax.random.normal(k1, (64, 64))
    ref = 3.0 * jax.random.normal(k2, (64, 64))
    assert bool(jnp.all(grpo.kl_divergence(logp, ref, "k3") >= 0))


def test_kl_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        grpo.kl_divergence(jnp.zeros(2), jnp.zeros(2), "k4")


# ----------------------------------------------------------------------------- loss values


def test_sequence_mean_loss_and_clip_metrics():
    loss, metrics = loss_of(cfg_(loss_aggregation="sequence_mean"))
    expected = -(sum(OBJ_ROW0) / 2 + sum(OBJ_ROW1) / 3) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # 5 completion tokens, one clipped on each side, no dual clip
    np.testing.assert_allclose(metrics["clip_frac_high"], 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_low"], 1 / 5, rtol=1e-6)
    assert float(metrics["clip_frac_dual"]) == 0.0
    np.testing.assert_allclose(metrics["ratio_mean"], (1.1 + 1.3 + 0.9 + 0.75 + 1.5) / 5,
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_min"], 0.75, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_max"], 1.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["adv_mean"], -0.5, rtol=1e-6)
    np.testing.assert_allclose(metrics["adv_std"], 1.5, rtol=1e-6)
    assert float(metrics["kl"]) == 0.0


def test_token_mean_loss():
    loss, _ = loss_of(cfg_(loss_aggregation="token_mean"))
    expected = -(sum(OBJ_ROW0) + sum(OBJ_ROW1)) / 5
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_constant_normalizer_loss():
    loss, _ = loss_of(cfg_(loss_aggregation="constant_normalizer", max_completion_length=4))
    expected = -((sum(OBJ_ROW0) + sum(OBJ_ROW1)) / 4) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # loss_normalizer overrides max_completion_length
    loss, _ = loss_of(cfg_(loss_aggregation="constant_normalizer", loss_normalizer=10.0))
    np.testing.assert_allclose(loss, -((sum(OBJ_ROW0) + sum(OBJ_ROW1)) / 10) / 2, rtol=1e-5)


def test_dual_clip_loss():
    loss, metrics = loss_of(cfg_(loss_aggregation="token_mean", dual_clip=1.4))
    # row 1, r = 1.5 > c: max(-3.0, 1.4 * -2) = -2.8
    expected = -(1.1 + 1.28 - 1.8 - 1.6 - 2.8) / 5
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_frac_dual"], 1 / 5, rtol=1e-6)


def test_padding_rows_and_positions_are_ignored():
    # An all-padding row with garbage (inf / nan) log-probs changes nothing.
    logp = np.concatenate([LOGP, [[np.nan, -np.inf, 5.0]]])
    old = np.concatenate([OLD_LOGP, [[0.0, np.inf, -50.0]]])
    ref = np.concatenate([LOGP, [[np.inf, 0.0, 1.0]]])
    adv = np.concatenate([ADV, [7.0]])
    mask = np.concatenate([MASK, [[0, 0, 0]]])
    for agg in grpo.LOSS_AGGREGATIONS:
        cfg = cfg_(loss_aggregation=agg, beta=0.1)
        ref_loss, ref_metrics = loss_of(cfg, ref=jnp.asarray(LOGP))
        loss, metrics = loss_of(cfg, logp, old, jnp.asarray(ref), adv, mask)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-6, err_msg=k)


def test_kl_penalty_enters_loss():
    # ratio 1 and A = 0: the loss is beta * token-mean k3.
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    cfg = cfg_(beta=0.04, loss_aggregation="token_mean")
    loss, metrics = grpo.policy_loss(logp, logp, ref, jnp.zeros(1), jnp.ones((1, 2)), cfg)
    np.testing.assert_allclose(loss, 0.04 * sum(k3) / 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], sum(k3) / 2, rtol=1e-5)


def test_missing_reference_with_beta_raises():
    with pytest.raises(ValueError, match="beta"):
        loss_of(cfg_(beta=0.04))


def test_entropy_metric():
    _, metrics = loss_of(cfg_())
    np.testing.assert_allclose(metrics["entropy"], -(-1.0 - 0.5 - 0.3 - 1.2 - 0.7) / 5,
                               rtol=1e-6)
    ent = jnp.array([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    _, metrics = loss_of(cfg_(), entropy=ent)
    np.testing.assert_allclose(metrics["entropy"], 3.0, rtol=1e-6)


def test_jit_with_static_config():
    cfg = cfg_(loss_aggregation="token_mean")
    f = jax.jit(grpo.policy_loss, static_argnums=(5,))
    loss, _ = f(LOGP, OLD_LOGP, None, ADV, MASK, cfg)
    np.testing.assert_allclose(loss, -(sum(OBJ_ROW0) + sum(OBJ_ROW1)) / 5, rtol=1e-5)


# ----------------------------------------------------------------------------- gradients


def grad_logp(cfg, logp, old, adv, mask, ref=None):
    return jax.grad(lambda lp: grpo.policy_loss(lp, old, ref, adv, mask, cfg)[0])(logp)


def test_zero_advantage_gives_zero_gradient():
    k1, k2 = jax.random.split(jax.random.key(2))
    logp = jax.random.normal(k1, (4, 5)) - 1.0
    old = logp + 0.3 * jax.random.normal(k2, (4, 5))
    mask = jnp.ones((4, 5)).at[1, 3:].set(0)
    for agg in grpo.LOSS_AGGREGATIONS:
        g = grad_logp(cfg_(loss_aggregation=agg, dual_clip=2.0), logp, old, jnp.zeros(4), mask)
        np.testing.assert_array_equal(g, np.zeros((4, 5)))


def test_old_logp_gets_no_gradient():
    g = jax.grad(lambda old: loss_of(cfg_(), old=old)[0])(jnp.asarray(OLD_LOGP))
    np.testing.assert_array_equal(g, np.zeros_like(OLD_LOGP))


@pytest.mark.parametrize("agg", grpo.LOSS_AGGREGATIONS)
def test_first_pass_is_plain_policy_gradient(agg):
    # mu = 1: logp == old_logp, so rho == 1 and d loss / d logp = -A * mask / normaliser.
    logp = jnp.asarray(LOGP)
    adv = jnp.asarray(ADV)
    cfg = cfg_(loss_aggregation=agg, max_completion_length=4)
    loss, metrics = grpo.policy_loss(logp, logp, None, adv, MASK, cfg)
    assert float(metrics["ratio_min"]) == 1.0 and float(metrics["ratio_max"]) == 1.0
    norm = {
        "sequence_mean": np.array([[2 * 2], [2 * 3]], np.float32),  # n * |o_i|
        "token_mean": np.float32(5),  # completion tokens in the batch
        "constant_normalizer": np.float32(2 * 4),  # n * L
    }[agg]
    expected = -ADV[:, None] * MASK / norm
    np.testing.assert_allclose(grad_logp(cfg, logp, logp, adv, MASK), expected, rtol=1e-6)


def one_token_grad(ratio, adv, **kw):
    # One completion of one token, old_logp = 0, so logp = log(ratio).
    cfg = cfg_(num_generations=2, **kw)
    g = grad_logp(cfg, jnp.log(jnp.array([[ratio]], jnp.float32)), jnp.zeros((1, 1)),
                  jnp.array([adv], jnp.float32), jnp.ones((1, 1)))
    return float(g[0, 0])


@pytest.mark.parametrize("ratio, zero", [
    (1.5, True),   # above 1 + eps_high = 1.28: clipped
    (1.2, False),  # inside the range
    (0.5, False),  # below 1 - eps_low: PPO's min keeps the unclipped term for A > 0
])
def test_clip_gradient_positive_advantage(ratio, zero):
    g = one_token_grad(ratio, 1.0)
    assert g == 0.0 if zero else g == pytest.approx(-ratio, rel=1e-5)


@pytest.mark.parametrize("ratio, zero", [
    (0.5, True),   # below 1 - eps_low = 0.8: clipped
    (0.9, False),  # inside the range
    (1.5, False),  # above 1 + eps_high: unclipped for A < 0
    (4.0, False),  # no dual clip: unbounded
])
def test_clip_gradient_negative_advantage(ratio, zero):
    g = one_token_grad(ratio, -1.0)
    assert g == 0.0 if zero else g == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("ratio, zero", [(4.0, True), (2.5, False), (0.5, True)])
def test_dual_clip_gradient(ratio, zero):
    g = one_token_grad(ratio, -1.0, dual_clip=3.0)
    assert g == 0.0 if zero else g == pytest.approx(ratio, rel=1e-5)
    # dual clip never touches positive advantages
    assert one_token_grad(ratio, 1.0, dual_clip=3.0) == one_token_grad(ratio, 1.0)


# ----------------------------------------------------------------------------- helpers


def test_groups_with_signal_and_rollout_metrics():
    rewards = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(grpo.groups_with_signal(rewards), [True, False, False])
    m = grpo.rollout_metrics(rewards, jnp.array([10, 20, 30, 40, 50, 60]),
                             jnp.array([False, False, False, False, True, True]))
    np.testing.assert_allclose(m["reward_mean"], 0.5)
    np.testing.assert_allclose(m["reward_std"], 0.5)
    np.testing.assert_allclose(m["length_mean"], 35.0)
    np.testing.assert_allclose(m["length_min"], 10.0)
    np.testing.assert_allclose(m["length_max"], 60.0)
    np.testing.assert_allclose(m["truncated_frac"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["no_signal_group_frac"], 2 / 3, rtol=1e-6)


def test_overlong_penalty():
    # L_max = 20, L_cache = 4: free up to 16 tokens, linear to -1 at 20.
    got = grpo.overlong_penalty(jnp.array([10, 16, 18, 20, 25]), 20, 4)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.5, -1.0, -1.0])


# ----------------------------------------------------------------------------- config


def test_presets():
    math_cfg = grpo.grpo_deepseekmath()
    assert (math_cfg.num_generations, math_cfg.beta, math_cfg.epsilon_low) == (64, 0.04, 0.2)
    assert math_cfg.loss_aggregation == "sequence_mean" and math_cfg.kl_estimator == "k3"
    zero = grpo.r1_zero()
    assert (zero.num_generations, zero.beta, zero.learning_rate) == (16, 0.001, 3e-6)
    d = grpo.dapo()
    assert (d.epsilon_low, d.epsilon_high, d.beta) == (0.2, 0.28, 0.0)
    assert d.loss_aggregation == "token_mean" and d.dynamic_sampling and d.overlong_buffer
    dr = grpo.dr_grpo()
    assert not dr.scale_rewards and dr.loss_aggregation == "constant_normalizer"
    assert dr.beta == 0.0 and dr.normalizer == float(dr.max_completion_length)
    assert GRPOConfig().std_ddof == 1
    assert dataclasses.replace(GRPOConfig(), std_estimator="population").std_ddof == 0
    hash(math_cfg)  # static under jit


@pytest.mark.parametrize("field, value", [
    ("num_generations", 1), ("num_generations", 4.0), ("epsilon_low", 0.0),
    ("epsilon_high", -0.1), ("dual_clip", 1.0), ("beta", -0.01), ("kl_estimator", "k4"),
    ("num_iterations", 0), ("scale_rewards", 1), ("std_estimator", "sample"),
    ("advantage_eps", -1e-4), ("loss_aggregation", "sum"), ("max_completion_length", 0),
    ("loss_normalizer", 0.0), ("temperature", 0.0), ("dynamic_sampling", "yes"),
    ("overlong_buffer", 1024), ("learning_rate", -1.0),
])
def test_bad_config_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"GRPOConfig\.{field} .*{value!r}"):
        GRPOConfig(**{field: value})
