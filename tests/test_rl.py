"""GRPO rollouts and the train step: batch layout, dynamic sampling, the mu = 1 policy
gradient, routing replay, the router-bias update, gradient accumulation, the sharded step,
and a small policy that actually learns a rule reward.

Compiles dominate the run time, so every test uses one of two tiny models (a Qwen2-shaped
dense model over the character vocabulary, and a DeepSeek-V3-shaped MoE without MTP),
batches of a few fixed shapes, and functions compiled once in module-scoped fixtures.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import r1jax
from r1jax.data.tokenizer import CharTokenizer
from r1jax.model.transformer import param_shardings
from r1jax.rl import grpo, rollout, train
from r1jax.rl.rollout import Groups
from r1jax.sampling import SamplingConfig, sample
from r1jax.training import apply_gradients, init_train_state, make_optimizer, state_shardings

TOK = CharTokenizer()
CFG = r1jax.configs.tiny_dense(vocab_size=TOK.vocab_size)
# one MoE stack (no dense layers, no MTP): fewer programs to compile
MOE_CFG = r1jax.configs.tiny_moe(vocab_size=TOK.vocab_size, num_nextn_predict_layers=0,
                                 num_hidden_layers=2, first_k_dense_replace=0)
G = 8  # completions per prompt of the dense rollouts
P, N = 4, 8  # prompt width and max_new_tokens of the dense rollouts: T = 12
GCFG = grpo.GRPOConfig(num_generations=G, beta=0.0, loss_aggregation="sequence_mean",
                       learning_rate=1e-2)
# eps = 1e-3 keeps the first Adam step smooth in the gradient (no g / |g| sign flips at
# g ~ 0), so runs whose gradients differ only by summation order give close parameters.
OPT = make_optimizer(GCFG.learning_rate, weight_decay=0.1, eps=1e-3)
# 13 upper-case letters stop a row (about 1 in 8 tokens at random init, so a rollout has
# both stopped and truncated rows).
STOPS = tuple(TOK.token_to_id(c) for c in "ABCDEFGHIJKLM")
SCFG = SamplingConfig(max_new_tokens=N, temperature=1.0, stop_token_ids=STOPS)



def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(np.asarray(x)), tree)


def _random_groups(seed, b, g, p, n, vocab=TOK.vocab_size, shared_prompts=False):
    """Groups with random prompts / completions of random lengths and random rewards; each
    row its own prompt tokens unless `shared_prompts` (then one per group)."""
    rng = np.random.default_rng(seed)
    plen = np.repeat(rng.integers(1, p + 1, b), g).astype(np.int32)
    ptok = rng.integers(7, vocab, (b * g, p)).astype(np.int32)
    if shared_prompts:
        ptok = np.repeat(ptok[::g], g, axis=0)
    ptok[np.arange(p)[None] >= plen[:, None]] = 0
    lengths = rng.integers(1, n + 1, b * g).astype(np.int32)
    tokens = rng.integers(7, vocab, (b * g, n)).astype(np.int32)
    rewards = rng.random((b, g)).astype(np.float32)
    return Groups([{"i": i} for i in range(b)], [""] * (b * g), ptok, plen, tokens, lengths,
                  lengths == n, rewards, None)


@pytest.fixture(scope="module")
def dense_params():
    return r1jax.init_params(jax.random.key(0), CFG)


@pytest.fixture(scope="module")
def dense_step():
    """The jitted train step of the dense model, shared by the tests that use [32, 12] batches."""
    return train.make_train_step(CFG, GCFG, OPT)


@pytest.fixture(scope="module")
def dense_batch():
    """A [32, 12] rollout batch (4 prompts x G = 8) of random tokens."""
    return rollout.assemble_batch(_random_groups(1, 4, G, P, N), CFG, GCFG, params=None)


# 1. assemble_batch ---------------------------------------------------------------------------

def _hand_groups(experts=None):
    """2 prompts x G = 2, prompt width 3, completion width 4 (junk 9s after each length)."""
    prompt = np.array([[11, 12, 0], [11, 12, 0], [21, 22, 23], [21, 22, 23]], np.int32)
    completion = np.array([[31, 9, 9, 9], [41, 42, 43, 44], [51, 52, 53, 9], [61, 62, 9, 9]],
                          np.int32)
    return Groups([{"q": "a"}, {"q": "b"}], ["w", "xxxx", "yyy", "zz"], prompt,
                  np.array([2, 2, 3, 3], np.int32), completion, np.array([1, 4, 3, 2], np.int32),
                  np.array([False, True, False, False]),
                  np.array([[1.0, 0.0], [0.2, 0.2]], np.float32), experts)


def test_assemble_batch_layout_mask_and_advantages():
    groups = _hand_groups()
    cfg = grpo.GRPOConfig(num_generations=2, beta=0.0)
    batch = rollout.assemble_batch(groups, CFG, cfg, params=None)
    np.testing.assert_array_equal(batch.tokens, [[11, 12, 31, 0, 0, 0, 0],
                                                 [11, 12, 41, 42, 43, 44, 0],
                                                 [21, 22, 23, 51, 52, 53, 0],
                                                 [21, 22, 23, 61, 62, 0, 0]])
    assert batch.tokens.dtype == jnp.int32
    # mask[i, t] = 1 iff token t + 1 (the target of position t) is a completion token
    np.testing.assert_array_equal(batch.mask, [[0, 1, 0, 0, 0, 0],
                                               [0, 1, 1, 1, 1, 0],
                                               [0, 0, 1, 1, 1, 0],
                                               [0, 0, 1, 1, 0, 0]])
    assert batch.mask.dtype == jnp.float32
    a = 0.5 / (np.sqrt(0.5) + 1e-4)  # (r - mean) / (unbiased std + eps); flat group -> 0
    np.testing.assert_allclose(batch.advantages, [a, -a, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(batch.rewards, np.float32([1.0, 0.0, 0.2, 0.2]))
    np.testing.assert_array_equal(batch.lengths, [1, 4, 3, 2])
    np.testing.assert_array_equal(batch.truncated, [False, True, False, False])
    assert batch.old_logp is None and batch.ref_logp is None and batch.experts is None
    # the rows of each group share their prompt: its forward pass may run once per group
    assert batch.group_size == 2
    assert rollout.assemble_batch(groups, CFG, cfg, params=None, share_prompts=False).group_size is None
    unshared = rollout.assemble_batch(_random_groups(1, 4, G, P, N), CFG, GCFG, params=None)
    assert unshared.group_size is None  # every row its own random prompt

    dr = rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.0,
                                                             scale_rewards=False), params=None)
    np.testing.assert_allclose(dr.advantages, [0.5, -0.5, 0.0, 0.0], rtol=1e-6)


def test_assemble_batch_old_and_ref_logprobs(dense_params):
    groups = _hand_groups()
    tokens = rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.0),
                                    params=None).tokens
    full = np.asarray(rollout.sequence_logprobs(dense_params, tokens, CFG))
    assert full.shape == (4, 6)

    mu2 = rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.0,
                                                              num_iterations=2),
                                 params=dense_params)
    assert mu2.ref_logp is None
    # log-probs only over each row's completion window (N = 4 positions from its first
    # target; the rest are 0), which holds every target
    assert mu2.completion_width == groups.tokens.shape[1] == 4
    window = np.zeros((4, 6), bool)
    for r, pos in enumerate(np.asarray(mu2.logprob_positions())):
        window[r, pos[pos < 6]] = True
    assert np.all(window[np.asarray(mu2.mask) > 0]) and not window.all()
    expected = np.where(window, full, 0.0)
    np.testing.assert_allclose(mu2.old_logp, expected, atol=1e-6)

    with_kl = rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.04),
                                     params=dense_params, ref_params=dense_params)
    assert with_kl.old_logp is None
    np.testing.assert_allclose(with_kl.ref_logp, expected, atol=1e-6)

    with pytest.raises(ValueError, match=r"beta=0.04 > 0 needs ref_params"):
        rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.04),
                               params=dense_params)


def test_completion_window_gives_the_same_loss_and_gradients(dense_params):
    """The GRPO loss over log-probs of the completion windows only equals the loss over
    all positions, and so do its gradients."""
    gcfg = grpo.GRPOConfig(num_generations=2, beta=0.04)
    windowed = rollout.assemble_batch(_hand_groups(), CFG, gcfg, params=dense_params,
                                      ref_params=dense_params)
    everywhere = dataclasses.replace(windowed, completion_width=None)
    grad = jax.jit(jax.value_and_grad(lambda p, b: train.grpo_loss(p, b, CFG, gcfg)[0]))
    (loss_w, grads_w), (loss_e, grads_e) = grad(dense_params, windowed), grad(dense_params, everywhere)
    np.testing.assert_allclose(loss_w, loss_e, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(grads_w), jax.tree.leaves(grads_e)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads_e))


def test_assemble_batch_passes_experts_only_with_routing_replay():
    experts = np.arange(4 * 1 * 8 * 2, dtype=np.int32).reshape(4, 1, 8, 2)  # S = 8 > T = 7
    groups = _hand_groups(experts)
    cfg = grpo.GRPOConfig(num_generations=2, beta=0.0)
    replay = rollout.assemble_batch(groups, CFG, cfg, params=None, routing_replay=True)
    np.testing.assert_array_equal(replay.experts, experts[:, :, :7])
    assert rollout.assemble_batch(groups, CFG, cfg, params=None).experts is None
    assert rollout.assemble_batch(_hand_groups(), CFG, cfg, params=None,
                                  routing_replay=True).experts is None


# 2. generate_groups --------------------------------------------------------------------------

def test_generate_groups_shapes_rewards_and_truncation(dense_params):
    examples = [{"q": "1+1=", "bonus": 0.0}, {"q": "7", "bonus": 10.0},
                {"q": "ab", "bonus": 20.0}, {"q": "x=", "bonus": 30.0}]
    calls = []

    def reward_fn(completion, q, bonus):
        calls.append((completion, q))
        return completion.count("1") + bonus

    groups = rollout.generate_groups(dense_params, CFG, examples, tokenizer=TOK,
                                     prompt_fn=lambda ex: ex["q"], reward_fn=reward_fn,
                                     num_generations=G, scfg=SCFG, key=jax.random.key(3),
                                     prompt_len=P)
    n = len(examples) * G
    assert groups.prompt_tokens.shape == (n, P) and groups.tokens.shape == (n, N)
    assert groups.lengths.shape == groups.truncated.shape == (n,)
    assert groups.rewards.shape == (len(examples), G) and groups.experts is None
    assert groups.examples == examples and len(groups.completions) == n
    for i, ex in enumerate(examples):
        ids = TOK.encode(ex["q"])
        rows = slice(i * G, (i + 1) * G)
        np.testing.assert_array_equal(groups.prompt_lengths[rows], len(ids))
        np.testing.assert_array_equal(groups.prompt_tokens[rows, :len(ids)], np.tile(ids, (G, 1)))
        np.testing.assert_array_equal(groups.prompt_tokens[rows, len(ids):], TOK.pad_id)
    assert [q for _, q in calls] == [ex["q"] for ex in examples for _ in range(G)]
    for r in range(n):
        length = groups.lengths[r]
        completion = TOK.decode(groups.tokens[r, :length])
        assert groups.completions[r] == completion
        assert groups.rewards[r // G, r % G] == completion.count("1") + examples[r // G]["bonus"]
        stops = np.isin(groups.tokens[r, :length], STOPS)
        if groups.truncated[r]:  # ran to max_new_tokens without a stop token
            assert length == N and not stops.any()
        else:  # stopped at (and kept) the first stop token
            assert stops[-1] and not stops[:-1].any()
            np.testing.assert_array_equal(groups.tokens[r, length:], SCFG.pad_id)
    assert groups.truncated.any() and not groups.truncated.all(), groups.truncated


# 3. collect_groups (DAPO dynamic sampling) ---------------------------------------------------

def _fake_groups(examples, keys_seen, key):
    """Two completions per example, rewards from the example, rows tagged by example id."""
    keys_seen.append(np.asarray(jax.random.key_data(key)))
    ids = np.repeat([ex["id"] for ex in examples], 2).astype(np.int32)
    j = np.tile([0, 1], len(examples)).astype(np.int32)
    n = len(ids)
    return Groups(list(examples), [f"{a}/{b}" for a, b in zip(ids, j)], np.stack([ids, ids], 1),
                  np.ones(n, np.int32), np.stack([ids, j, ids], 1), np.full(n, 3, np.int32),
                  np.zeros(n, bool),
                  np.array([ex["r"] for ex in examples], np.float32),
                  np.broadcast_to(ids[:, None, None, None], (n, 1, 5, 1)).copy())


def _rounds(*rounds):
    """An iterator over lists of examples; 'F' = flat rewards, 'S' = rewards with signal."""
    out, next_id = [], 0
    for spec in rounds:
        out.append([{"id": next_id + i, "r": [0.5, 0.5] if c == "F" else [0.0, 1.0]}
                    for i, c in enumerate(spec)])
        next_id += len(spec)
    return iter(out)


def _collect(rounds, num_prompts, dynamic, max_rounds=8):
    keys = []
    groups, info = rollout.collect_groups(functools.partial(_fake_example_fn, keys=keys), rounds,
                                          jax.random.key(7), num_prompts, dynamic, max_rounds)
    return groups, info, keys


def _fake_example_fn(examples, key, keys):
    return _fake_groups(examples, keys, key)


def _ids(groups):
    return [ex["id"] for ex in groups.examples]


def test_collect_groups_without_dynamic_sampling_takes_one_round():
    groups, info, keys = _collect(_rounds("FS", "SS"), 2, dynamic=False)
    assert _ids(groups) == [0, 1] and len(keys) == 1
    assert info == {"rounds": 1, "kept_groups_frac": 1.0}


def test_collect_groups_drops_flat_groups_and_refills():
    rounds = _rounds("FSF", "FFS", "SFS", "SS")
    groups, info, keys = _collect(rounds, 3, dynamic=True)
    assert _ids(groups) == [1, 5, 6]  # signal groups in order; the 3rd round's 2nd one not needed
    assert next(rounds)  # the iterator was not drained
    assert info == {"rounds": 3, "kept_groups_frac": 1.0, "signal_groups_frac": 4 / 9}
    # fixed output size, rows follow their groups in every field
    assert groups.rewards.shape == (3, 2) and groups.tokens.shape == (6, 3)
    np.testing.assert_array_equal(groups.rewards, [[0.0, 1.0]] * 3)
    row_ids = np.repeat([1, 5, 6], 2)
    np.testing.assert_array_equal(groups.prompt_tokens[:, 0], row_ids)
    np.testing.assert_array_equal(groups.tokens[:, :2], np.stack([row_ids, [0, 1] * 3], 1))
    np.testing.assert_array_equal(groups.experts[:, 0, 0, 0], row_ids)
    assert groups.completions == ["1/0", "1/1", "5/0", "5/1", "6/0", "6/1"]
    assert len({k.tobytes() for k in keys}) == 3  # a fresh key each round

    batch = rollout.assemble_batch(groups, CFG, grpo.GRPOConfig(num_generations=2, beta=0.0),
                                   params=None)
    assert batch.tokens.shape == (6, 5) and np.all(np.abs(batch.advantages) > 0.5)


def test_collect_groups_max_rounds_fallback_keeps_shapes():
    groups, info, keys = _collect(_rounds("FFS", "FFF", "SSS"), 4, dynamic=True, max_rounds=2)
    assert len(keys) == 2
    # the one signal group first, then flat groups in order, to keep the batch size
    assert _ids(groups) == [2, 0, 1, 3]
    assert groups.tokens.shape == (8, 3) and groups.rewards.shape == (4, 2)
    assert info == {"rounds": 2, "kept_groups_frac": 0.25, "signal_groups_frac": 1 / 6}
    advantages = grpo.group_advantages(groups.rewards)
    np.testing.assert_array_equal(np.asarray(advantages)[1:], 0.0)


# 4. the mu = 1 step is the plain policy gradient ---------------------------------------------

@jax.jit
def _grpo_and_reinforce_grads(params, batch):
    """(loss, metrics, grad of grpo_loss, grad of the hand-written REINFORCE surrogate)."""
    def surrogate(p):
        logp = rollout.policy_logprobs(p, batch.tokens, CFG)[0]
        m = batch.mask > 0
        row_mean = jnp.where(m, logp, 0.0).sum(1) / m.sum(1)
        return -jnp.sum(batch.advantages * row_mean) / batch.tokens.shape[0]

    (loss, (metrics, _)), grads = jax.value_and_grad(train.grpo_loss, has_aux=True)(
        params, batch, CFG, GCFG)
    return loss, metrics, grads, jax.grad(surrogate)(params)


def _assert_trees_close(a, b, rtol, atol, what=""):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_mu1_step_ratio_is_one(dense_params, dense_batch, dense_step):
    state = init_train_state(_copy(dense_params), OPT, jax.random.key(0))
    state, metrics = dense_step(state, dense_batch)
    assert float(metrics["ratio_mean"]) == float(metrics["ratio_min"]) == \
        float(metrics["ratio_max"]) == 1.0
    assert float(metrics["clip_frac_low"]) == float(metrics["clip_frac_high"]) == 0.0
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_mu1_gradient_is_reinforce_and_zero_without_advantage(dense_params, dense_batch):
    loss, metrics, grads, reinforce = _grpo_and_reinforce_grads(dense_params, dense_batch)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(reinforce))
    assert scale > 1e-3  # a real gradient, not zero on both sides
    _assert_trees_close(grads, reinforce, rtol=1e-4, atol=1e-6 * scale)
    # with mu = 1 the surrogate's value is -mean(A) per row-mean: 0 for centred advantages
    assert abs(float(loss)) < 1e-5

    flat = dataclasses.replace(dense_batch, advantages=jnp.zeros_like(dense_batch.advantages))
    _, _, zero, _ = _grpo_and_reinforce_grads(dense_params, flat)
    for path, g in jax.tree_util.tree_leaves_with_path(zero):
        assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)


def test_kl_is_zero_when_reference_is_policy(dense_params, dense_batch):
    kl_cfg = grpo.GRPOConfig(num_generations=G, beta=0.04, loss_aggregation="sequence_mean")
    groups = _random_groups(1, 4, G, P, N)
    batch = rollout.assemble_batch(groups, CFG, kl_cfg, params=dense_params,
                                   ref_params=dense_params)
    np.testing.assert_array_equal(batch.tokens, dense_batch.tokens)
    loss, (metrics, _) = jax.jit(train.grpo_loss, static_argnums=(2, 3))(
        dense_params, batch, CFG, kl_cfg)
    assert abs(float(metrics["kl"])) < 1e-10, float(metrics["kl"])
    assert abs(float(loss)) < 1e-5  # centred advantages, ratio 1, no KL: nothing left


# 5. routing replay ---------------------------------------------------------------------------

MOE_G, MOE_N = 4, 6


@pytest.fixture(scope="module")
def moe_rollout():
    params = r1jax.init_params(jax.random.key(1), MOE_CFG)
    scfg = SamplingConfig(max_new_tokens=MOE_N, temperature=1.0, record_experts=True)
    examples = [{"q": "1+1"}, {"q": "12+3"}]  # prompt lengths 3 and 4, width P = 4
    key = jax.random.key(5)
    groups = rollout.generate_groups(params, MOE_CFG, examples, tokenizer=TOK,
                                     prompt_fn=lambda ex: ex["q"],
                                     reward_fn=lambda c, q: float(sum(ch.isdigit() for ch in c)),
                                     num_generations=MOE_G, scfg=scfg, key=key, prompt_len=P)
    samples = sample(params, MOE_CFG, groups.prompt_tokens, groups.prompt_lengths, key, scfg)
    np.testing.assert_array_equal(samples.tokens, groups.tokens)
    cfg = grpo.GRPOConfig(num_generations=MOE_G, beta=0.0)
    batch = rollout.assemble_batch(groups, MOE_CFG, cfg, params=params, routing_replay=True)
    return params, groups, samples, batch


def _experts_of(params, batch, experts):
    out = r1jax.forward(params, batch.tokens, MOE_CFG, with_mtp=False,
                        routing={"moe": jnp.moveaxis(experts, 0, 1)})
    return np.moveaxis(np.asarray(out.aux["experts"]), 1, 0)  # [n, l, T, k]


def test_routing_replay_uses_recorded_experts(moe_rollout):
    params, groups, samples, batch = moe_rollout
    n, t = batch.tokens.shape
    assert batch.experts.shape == (n, MOE_CFG.num_moe_layers, t, MOE_CFG.num_experts_per_tok)
    recorded = np.asarray(batch.experts)
    known = recorded >= 0
    # every position fed to the model was recorded; only the last generated token never is
    plen = groups.prompt_lengths
    fed = np.arange(t)[None] < (plen + groups.lengths - 1)[:, None]
    assert np.all(known.all(axis=(1, 3))[fed])

    replayed = _experts_of(params, batch, batch.experts)
    np.testing.assert_array_equal(replayed[known], recorded[known])
    assert np.all(replayed >= 0)  # -1 entries were routed afresh

    # the trainer's log-probs with replay are the sampler's, position by position
    logp = np.asarray(rollout.sequence_logprobs(params, batch.tokens, MOE_CFG, 1.0, batch.experts))
    expected = np.zeros_like(logp)
    for i in range(n):
        length = groups.lengths[i]
        expected[i, plen[i] - 1:plen[i] - 1 + length] = samples.logprobs[i, :length]
    mask = np.asarray(batch.mask) > 0
    np.testing.assert_allclose(logp[mask], expected[mask], atol=1e-5, rtol=0)


def test_routing_replay_survives_a_router_change(moe_rollout):
    params, _, _, batch = moe_rollout
    mlp = params.moe_layers.mlp
    noise = jax.random.normal(jax.random.key(9), mlp.router.shape) * 0.5
    moved = dataclasses.replace(params, moe_layers=dataclasses.replace(
        params.moe_layers, mlp=dataclasses.replace(mlp, router=mlp.router + noise)))
    recorded = np.asarray(batch.experts)
    known = recorded >= 0
    replayed = _experts_of(moved, batch, batch.experts)
    np.testing.assert_array_equal(replayed[known], recorded[known])
    fresh = _experts_of(moved, batch, jnp.full_like(batch.experts, -1))
    changed = np.mean(np.sort(fresh, -1)[known] != np.sort(recorded, -1)[known])
    assert changed > 0.2, changed


# 6. router-bias update -----------------------------------------------------------------------

def _with_bias(params):
    """The MoE params with a non-zero router bias (so weight decay would show if applied)."""
    mlp = params.moe_layers.mlp
    bias = jnp.linspace(-0.02, 0.02, mlp.router_bias.size, dtype=jnp.float32)
    bias = bias.reshape(mlp.router_bias.shape)
    return dataclasses.replace(params, moe_layers=dataclasses.replace(
        params.moe_layers, mlp=dataclasses.replace(mlp, router_bias=bias)))


def _bias_step_expected(old_bias, load, rate):
    load = np.asarray(load, np.float32)
    sign = np.sign(load.mean(-1, keepdims=True) - load).astype(np.float32)
    return old_bias + np.float32(rate) * sign


def test_router_bias_update_in_train_step(moe_rollout):
    params, _, _, batch = moe_rollout
    params = _with_bias(params)
    old_bias = np.asarray(params.moe_layers.mlp.router_bias)
    opt = make_optimizer(1e-2, weight_decay=0.5)
    step = train.make_train_step(MOE_CFG, grpo.GRPOConfig(num_generations=MOE_G, beta=0.0), opt,
                                 router_bias_rate=0.01)
    state, metrics = step(init_train_state(_copy(params), opt, jax.random.key(0)), batch)
    load = np.asarray(metrics["expert_load"])
    assert load.shape == old_bias.shape and np.all(load.sum(-1) > 0)
    new_bias = np.asarray(state.params.moe_layers.mlp.router_bias)
    # exactly +-0.01 (0 where a load equals the mean): neither AdamW nor weight decay touched it
    np.testing.assert_array_equal(new_bias, _bias_step_expected(old_bias, load, 0.01))
    assert np.any(new_bias != old_bias)
    router = np.asarray(params.moe_layers.mlp.router)
    assert np.any(np.asarray(state.params.moe_layers.mlp.router) != router)  # Adam did run


def test_router_bias_unchanged_at_rate_zero(moe_rollout):
    """`apply_gradients` (the update inside every train step) with the default rate 0, a
    non-zero gradient on the bias, and weight decay: the bias stays exactly as it was."""
    params = _with_bias(moe_rollout[0])
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
    opt = make_optimizer(1e-2, weight_decay=0.5)
    state = init_train_state(params, opt, jax.random.key(0))
    e = MOE_CFG.n_routed_experts
    load = jnp.tile(jnp.array([1] * (e - 2) + [0, 2], jnp.int32), (MOE_CFG.num_moe_layers, 1))
    new, metrics = jax.jit(apply_gradients, static_argnums=(2, 4))(state, grads, opt, load, 0.0)
    np.testing.assert_array_equal(new.params.moe_layers.mlp.router_bias,
                                  np.asarray(params.moe_layers.mlp.router_bias))
    np.testing.assert_array_equal(metrics["expert_load"], load)
    assert np.all(np.asarray(new.params.embed) != np.asarray(params.embed))


# 7. gradient accumulation --------------------------------------------------------------------

def test_grad_accumulation_matches_one_big_batch(dense_params, dense_batch, dense_step):
    results = []
    for step in (dense_step, train.make_train_step(CFG, GCFG, OPT, grad_accum_steps=2)):
        state = init_train_state(_copy(dense_params), OPT, jax.random.key(0))
        results.append(step(state, dense_batch))
    (one, m1), (two, m2) = results
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), atol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(one.params), jax.tree.leaves(dense_params)))
    assert moved > 1e-3
    _assert_trees_close(two.params, one.params, rtol=1e-5, atol=1e-6, what="params")


# 8. sharded train step == single-device step -------------------------------------------------

@pytest.mark.parametrize("shared_prompts", [False, True])
def test_sharded_train_step_matches_single_device(shared_prompts):
    cfg = r1jax.configs.tiny_dense(vocab_size=104)  # vocab divisible by tensor = 2
    mesh = r1jax.make_mesh("data=2,fsdp=2,tensor=2")
    rules = r1jax.MeshRules(mesh)
    params = r1jax.init_params(jax.random.key(2), cfg, mesh=mesh)
    shardings = param_shardings(cfg, mesh)
    single_params = _copy(params)

    gcfg = grpo.GRPOConfig(num_generations=4, beta=0.0, loss_aggregation="sequence_mean")
    groups = _random_groups(4, 2, 4, P, N, vocab=104, shared_prompts=shared_prompts)
    batch = rollout.assemble_batch(groups, cfg, gcfg, params=None)
    assert batch.group_size == (4 if shared_prompts else None)  # 2 prompts: fewer than 4 shards
    state = init_train_state(params, OPT, jax.random.key(0))
    st_sh = state_shardings(OPT, state.opt_state, shardings, rules)
    state = jax.device_put(state, st_sh)
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert")))
    sharded_batch = jax.tree.map(lambda x: jax.device_put(x, batch_sh), batch)

    sharded_step = train.make_train_step(cfg, gcfg, OPT, mesh_rules=rules, state_shardings=st_sh)
    single_step = train.make_train_step(cfg, gcfg, OPT)
    out, m_sh = sharded_step(state, sharded_batch)
    ref, m_ref = single_step(init_train_state(single_params, OPT, jax.random.key(0)), batch)

    np.testing.assert_allclose(float(m_sh["loss"]), float(m_ref["loss"]), atol=1e-6)
    np.testing.assert_allclose(float(m_sh["grad_norm"]), float(m_ref["grad_norm"]), rtol=1e-5)
    _assert_trees_close(out.params, ref.params, rtol=1e-5, atol=1e-6, what="params")
    # parameters and optimizer moments keep their layout: no silent replication
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(out.params),
                            jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (jax.tree_util.keystr(path), x.sharding, s)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    for x, s in zip(jax.tree.leaves(out.opt_state), jax.tree.leaves(st_sh.opt_state)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


# 9. a tiny policy learns a rule reward -------------------------------------------------------

def test_grpo_learns_to_write_digits(dense_params, dense_step):
    """R1-Zero in miniature: reward = fraction of completion characters that are digits
    (a row stops at A-M, so the policy must also learn to avoid those)."""
    def reward(completion, q):
        return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)

    state = init_train_state(_copy(dense_params), OPT, jax.random.key(1))
    prompts = [{"q": f"{i}+{i}="} for i in range(4)]

    def examples():
        while True:
            yield prompts

    it = examples()
    history = []
    for s in range(20):
        generate = functools.partial(_generate_digits, state.params, reward=reward)
        groups, _ = rollout.collect_groups(generate, it, jax.random.fold_in(jax.random.key(2), s),
                                           len(prompts), dynamic_sampling=False)
        batch = rollout.assemble_batch(groups, CFG, GCFG, params=state.params)
        state, _ = dense_step(state, batch)
        history.append(float(groups.rewards.mean()))
    start, end = np.mean(history[:3]), np.mean(history[-5:])
    msg = f"start {start:.3f}, final-5 mean {end:.3f}, history {np.round(history, 3).tolist()}"
    print(msg)
    assert end > start + 0.3 and end > 0.5, msg


def _generate_digits(params, examples, key, *, reward):
    return rollout.generate_groups(params, CFG, examples, tokenizer=TOK, prompt_fn=lambda e: e["q"],
                                   reward_fn=reward, num_generations=G, scfg=SCFG, key=key,
                                   prompt_len=P)


@pytest.mark.parametrize("kept_logits_bytes", [0, 1 << 30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("with_tied", [False, True], ids=["lm_head", "tied"])
def test_chunked_head_logprobs_equal_whole_logits(with_tied, kept_logits_bytes):
    """`head_logprobs` in chunks of a few positions (padding the last) gives the log-probs,
    entropies and gradients of the plain computation over whole logits, whether the
    backward pass keeps the chunks' logits or recomputes them."""
    from r1jax.losses import entropy, token_logprobs
    from r1jax.model.layers import rms_norm, unembed

    cfg = r1jax.configs.tiny_dense(tie_word_embeddings=with_tied)
    params = r1jax.init_params(jax.random.key(3), cfg)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 7, cfg.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(3, 7)), jnp.int32)

    def whole(params, h):
        logits = unembed(rms_norm(h, params.final_norm, cfg.rms_norm_eps), params.lm_head, params.embed)
        return token_logprobs(logits, targets, 0.7), entropy(logits, 0.7)

    def chunked(params, h):
        return rollout.head_logprobs(params, h, targets, cfg, 0.7, with_entropy=True, chunk_tokens=6,
                                     kept_logits_bytes=kept_logits_bytes)

    for a, b in zip(whole(params, h), chunked(params, h)):  # 3 rows x 2 positions per chunk
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-6)
    weights = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
    grad = lambda fn: jax.grad(lambda p, h: jnp.sum(fn(p, h)[0] * weights), argnums=(0, 1))(params, h)  # noqa: E731
    want, got = grad(whole), grad(chunked)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep_logits", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("vocab_major", [False, True], ids=["dv", "vd"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_gradient_equals_autodiff(vocab_major, keep_logits, temperature):
    """`losses.linear_logprobs`' hand-written gradient equals autodiff through
    `token_logprobs` of the same logits (weights of either layout, in bf16 too); its
    entropy equals `losses.entropy` and carries no gradient."""
    from r1jax.losses import entropy, linear_logprobs, token_logprobs

    rng = np.random.default_rng(7)
    m, d, v = 10, 16, 40
    h = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(v, d) if vocab_major else (d, v)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, size=m), jnp.int32)
    cot = jnp.asarray(rng.normal(size=m), jnp.float32)

    def plain(h, w):
        logits = jnp.einsum("md,vd->mv" if vocab_major else "md,dv->mv", h, w.astype(jnp.float32))
        return token_logprobs(logits, tokens, temperature), entropy(logits, temperature)

    def fused(h, w):
        return linear_logprobs(h, w, tokens, vocab_major=vocab_major, temperature=temperature,
                               with_entropy=True, keep_logits=keep_logits)

    for w in (weight, weight.astype(jnp.bfloat16)):
        for a, b, atol in zip(plain(h, w), fused(h, w), (2e-6, 2e-5)):  # logp, entropy
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=atol, rtol=1e-6)
        grad = lambda fn: jax.grad(lambda h, w: jnp.sum(fn(h, w)[0] * cot), argnums=(0, 1))(h, w)  # noqa: E731
        (dh_want, dw_want), (dh, dw) = grad(plain), grad(fused)
        assert dw.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(dh), np.asarray(dh_want), atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(dw_want, np.float32),
                                   atol=1e-6 if w.dtype == jnp.float32 else 1e-2, rtol=1e-5)
        assert np.abs(np.asarray(dh)).max() > 1e-2
    ent_grad = jax.grad(lambda h: jnp.sum(fused(h, weight)[1]))(h)
    assert not np.any(np.asarray(ent_grad))
    assert linear_logprobs(h, weight, tokens, vocab_major=vocab_major)[1] is None


def test_one_device_train_step_compiles_once():
    """`init_train_state` commits the state to its device like the step's outputs, so step 2
    reuses step 1's executable (uncommitted inputs made it compile twice)."""
    params = r1jax.init_params(jax.random.key(0), CFG)
    state = init_train_state(params, OPT, jax.random.key(1))
    step = r1jax.training.make_lm_train_step(CFG, OPT)
    tokens, mask = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.float32)
    for _ in range(3):
        state, _ = step(state, tokens, mask)
    assert step._cache_size() == 1
