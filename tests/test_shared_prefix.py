"""The prompt's forward pass once per GRPO group (`r1jax.model.shared_prefix`): the log-probs,
entropies, gradients, MoE loads and sequence-wise balance loss of `policy_logprobs` equal
those of the plain forward over whole rows, for GQA and for MLA + MoE with routing replay."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax.model.shared_prefix import forward_shared_prefix, prefix_sharing_applies
from r1jax.rl.rollout import policy_logprobs

DENSE = r1jax.configs.tiny_dense()
MOE = r1jax.configs.tiny_moe(aux_loss_alpha=0.01, num_nextn_predict_layers=0)
GROUPS, G, P, N = 3, 4, 12, 10  # prompts, rows per prompt, prompt width, completion width


def _batch(cfg, seed=0):
    """Rows i*G .. i*G+G-1 share prompt i (lengths 12, 7 and 4: padded differently) and
    have 1..N completion tokens; returns tokens [n, P+N], completion mask [n, P+N-1],
    positions [n, N] (from each row's first target) and real-token mask [n, P+N]."""
    rng = np.random.default_rng(seed)
    n = GROUPS * G
    prompts = rng.integers(2, cfg.vocab_size, (GROUPS, P))
    prompt_lengths = [P, 7, 4]
    lengths = rng.integers(1, N + 1, n)
    lengths[[0, G]] = N, 1
    tokens = np.zeros((n, P + N), np.int32)
    mask = np.zeros((n, P + N - 1), np.float32)
    for i in range(n):
        plen, length = prompt_lengths[i // G], lengths[i]
        tokens[i, :plen] = prompts[i // G, :plen]
        tokens[i, plen:plen + length] = rng.integers(2, cfg.vocab_size, length)
        mask[i, plen - 1:plen - 1 + length] = 1
    positions = np.argmax(mask > 0, 1)[:, None] + np.arange(N)
    last = (np.arange(1, P + N) * (mask > 0)).max(1)
    real = np.arange(P + N)[None] <= last[:, None]
    return tuple(map(jnp.asarray, (tokens, mask, positions, real)))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["gqa", "mla_moe"])
def test_shared_prompt_logprobs_equal_the_plain_forward(cfg):
    params = r1jax.init_params(jax.random.key(0), cfg, with_mtp=False)
    tokens, mask, positions, real = _batch(cfg)
    experts = None
    if cfg.num_moe_layers:  # replay a routing in which equal prompts route equally
        shape = (GROUPS, cfg.num_moe_layers, P + N, cfg.num_experts_per_tok)
        experts = jax.random.randint(jax.random.key(1), shape, 0, cfg.n_routed_experts)
        experts = jnp.repeat(experts, G, axis=0)
        experts = experts.at[:, :, P:].set(jax.random.randint(
            jax.random.key(2), experts[:, :, P:].shape, 0, cfg.n_routed_experts))

    def loss(p, group_size):
        logp, ent, aux = policy_logprobs(p, tokens, cfg, experts=experts, with_entropy=True,
                                         token_mask=real, positions=positions,
                                         group_size=group_size)
        balance = aux.get("balance_loss", 0.0)
        return ((logp * mask).sum() + 0.1 * (ent * mask).sum() + 100 * balance,
                (logp * mask, ent * mask, aux.get("expert_load"), balance))

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    assert prefix_sharing_applies(cfg, tokens.shape[0], G)
    (_, (logp, ent, load, balance)), grads = grad(params, None)
    (_, (logp_s, ent_s, load_s, balance_s)), grads_s = grad(params, G)
    assert float(jnp.abs(logp).min()) == 0 and float(jnp.abs(logp).max()) > 1
    np.testing.assert_allclose(logp_s, logp, atol=2e-5, rtol=0)
    np.testing.assert_allclose(ent_s, ent, atol=2e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()) + 1e-9, rtol=0)
    if cfg.num_moe_layers:  # each prompt token counted G times, padding not at all
        np.testing.assert_array_equal(load_s, load)
        assert int(load.sum()) == int(real.sum()) * cfg.num_experts_per_tok * cfg.num_moe_layers
        assert float(balance) > 0
        np.testing.assert_allclose(balance_s, balance, rtol=1e-5)


def test_prefix_sharing_applies_to_whole_groups():
    assert prefix_sharing_applies(DENSE, 12, 4)
    assert not prefix_sharing_applies(DENSE, 12, None)
    assert not prefix_sharing_applies(DENSE, 12, 1)
    assert not prefix_sharing_applies(DENSE, 10, 4)  # a micro-batch that splits a group
    assert prefix_sharing_applies(MOE, 12, 4)


def test_forward_shared_prefix_checks_the_row_count():
    params = r1jax.init_params(jax.random.key(0), DENSE, with_mtp=False)
    with pytest.raises(ValueError, match=r"7 rows, expected 2 prefixes x group_size 4 = 8"):
        forward_shared_prefix(params, jnp.zeros((2, 3), jnp.int32), jnp.array([3, 2]),
                              jnp.zeros((7, 5), jnp.int32), DENSE, 4)
