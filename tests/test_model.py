"""Properties of the model that no reference checks: causality (by gradient), packed
sequences, cached decode == full forward, absorbed MLA == naive MLA, sharded ==
unsharded, MTP causality, seed determinism, parameter counts, remat, bfloat16.

Two tiny random models: tiny_moe (MLA + DeepSeekMoE + MTP) and tiny_dense (Qwen2-shaped
GQA with tied embeddings). Most tests use the standard [2, 12] batch so `forward`
compiles few shapes.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax.losses import next_token_loss
from r1jax.model import attention, mtp, rope, transformer
from r1jax.model.cache import MLACache

from model_fixtures import B, T, distinct_tokens, layer, max_abs_diff, random_tokens
from model_fixtures import tiny_dense as _tiny_dense
from model_fixtures import tiny_moe as _tiny_moe

MODELS = {"moe": _tiny_moe, "dense": _tiny_dense}


@pytest.fixture(params=["moe", "dense"])
def model(request):
    """(name, cfg, params) for each tiny model."""
    cfg, params = MODELS[request.param]()
    return request.param, cfg, params


def _untied(cfg, params):
    """The same function with the head as a separate array (for gradients w.r.t. the
    embedding table that must only see the input side)."""
    if not cfg.tie_word_embeddings:
        return cfg, params
    return (cfg.replace(tie_word_embeddings=False),
            dataclasses.replace(params, lm_head=jnp.asarray(params.embed).T))


# Causality ------------------------------------------------------------------------------

def test_causality_by_gradient(model):
    """d logits[b, t] / d (input embedding at [b', s]) is exactly 0 when s > t or b' != b,
    and non-zero when b' == b and s <= t. Each token occurs once in the batch, so the
    gradient with respect to its embedding-table row is the gradient with respect to that
    position's input. For tiny_moe the same holds for the MTP logits at position t, which
    see tokens up to t + 1 (the MTP module embeds token t + 1)."""
    name, cfg, params = model
    cfg, params = _untied(cfg, params)
    tokens = distinct_tokens(0, (B, T))
    assert len(set(np.asarray(tokens).ravel().tolist())) == B * T
    probe = jax.random.normal(jax.random.key(7), (cfg.vocab_size,))

    def per_position(embed):
        out = r1jax.forward(dataclasses.replace(params, embed=embed), tokens, cfg)
        main = out.logits @ probe  # [b, t]
        if out.mtp_logits is None:
            return main[None]
        return jnp.stack([main, out.mtp_logits @ probe])

    jac = jax.jacrev(per_position)(params.embed)  # [heads, b, t, v, d]
    jac = np.asarray(jac)[:, :, :, np.asarray(tokens)]  # [heads, b, t, b', s, d]
    norms = np.abs(jac).sum(-1)
    same_row = np.eye(B, dtype=bool)[:, None, :, None]
    t_idx, s_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    assert norms.shape[0] == (2 if name == "moe" else 1)
    for head, reach in enumerate((0, 1)[:norms.shape[0]]):  # main sees s <= t, MTP s <= t + 1
        allowed = same_row & (s_idx <= t_idx + reach)[None, :, None, :]
        n = norms[head]
        assert np.all(n[~allowed] == 0.0), f"{name} head {head}: output depends on a later token"
        assert np.all(n[allowed] > 0.0), f"{name} head {head}: output ignores an earlier token"


def test_later_tokens_do_not_change_earlier_logits(model):
    name, cfg, params = model
    tokens = random_tokens(1)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 11) % cfg.vocab_size)
    a = r1jax.forward(params, tokens, cfg)
    b = r1jax.forward(params, changed, cfg)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :7]), np.asarray(b.logits[:, :7]))
    assert max_abs_diff(a.logits[:, 7:], b.logits[:, 7:]) > 1e-3  # the change is seen later
    if a.mtp_logits is not None:  # MTP at i reads token i + 1
        np.testing.assert_array_equal(np.asarray(a.mtp_logits[:, :6]), np.asarray(b.mtp_logits[:, :6]))
        assert max_abs_diff(a.mtp_logits[:, 6], b.mtp_logits[:, 6]) > 1e-3


# Packed sequences -----------------------------------------------------------------------

def test_default_positions_restart_per_segment():
    tokens = jnp.zeros((2, 6), jnp.int32)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(transformer.default_positions(tokens, seg),
                                  [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(transformer.default_positions(tokens, None),
                                  [[0, 1, 2, 3, 4, 5]] * 2)


def test_packed_sequences_equal_separate_runs(model):
    """Row 0 packs A (5 tokens) and B (7), row 1 packs C (8) and D (4). Each sequence run
    alone (at the start of a row, followed by filler the causal mask hides) gives the
    same logits as inside the pack; so do the MTP logits, except at a segment's last
    position, where MTP reads the next segment's first token."""
    name, cfg, params = model
    rows = np.asarray(random_tokens(2, (4, T)))
    lengths = [(5, 7), (8, 4)]
    packed = np.stack([np.concatenate([rows[0, :5], rows[1, :7]]),
                       np.concatenate([rows[2, :8], rows[3, :4]])])
    segments = np.asarray([[1] * 5 + [2] * 7, [3] * 8 + [9] * 4], np.int32)
    out = r1jax.forward(params, jnp.asarray(packed), cfg, segment_ids=jnp.asarray(segments))
    alone = [r1jax.forward(params, jnp.asarray(rows[i:i + 2]), cfg) for i in (0, 2)]
    for r, (la, lb) in enumerate(lengths):
        for ref, (start, length) in enumerate(((0, la), (la, lb))):
            err = max_abs_diff(out.logits[r, start:start + length], alone[r].logits[ref, :length])
            assert err < 1e-5, f"{name}: packed row {r} segment {ref} differs by {err:.3g}"
            if out.mtp_logits is not None:
                err = max_abs_diff(out.mtp_logits[r, start:start + length - 1],
                                   alone[r].mtp_logits[ref, :length - 1])
                assert err < 1e-5, f"{name}: packed MTP row {r} segment {ref} differs by {err:.3g}"


# KV cache ---------------------------------------------------------------------------------

def test_cached_decode_equals_full_forward(model):
    """Prefill 5 tokens into a cache of 12 slots, then feed the rest one at a time: each
    step's logits equal the no-cache forward's logits at that position."""
    name, cfg, params = model
    tokens = random_tokens(3)
    full = r1jax.forward(params, tokens, cfg).logits
    cache = r1jax.init_cache(cfg, B, T)
    out = r1jax.forward(params, tokens[:, :5], cfg, cache=cache)
    steps = [out.logits]
    for i in range(5, T):
        out = r1jax.forward(params, tokens[:, i:i + 1], cfg, cache=out.cache)
        steps.append(out.logits)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), [T, T])
    err = max_abs_diff(jnp.concatenate(steps, axis=1), full)
    assert err < 1e-5, f"{name}: cached decode differs from the full forward by {err:.3g}"


def test_cache_stores_mla_latent_only():
    cfg, _ = _tiny_moe()
    cache = r1jax.init_cache(cfg, 3, 10)
    assert cache.dense.latent_rope.shape == (cfg.num_dense_layers, 3, 10,
                                             cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.moe.latent_rope.shape == (cfg.num_moe_layers, 3, 10, 24)
    with pytest.raises(ValueError, match="max_length"):
        r1jax.init_cache(cfg, 1, 0)


# MLA paths ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mla_case():
    cfg, params = _tiny_moe()
    w = layer(params.dense_layers, 0).attn
    b, t, s = 2, 7, 10
    x = jax.random.normal(jax.random.key(3), (b, t, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(3, 3 + t, dtype=jnp.int32), (b, t))
    cos, sin = rope.rope_angles(positions, cfg)
    return cfg, w, x, positions, cos, sin, s


@pytest.mark.parametrize("with_cache", [False, True])
def test_absorbed_mla_equals_naive(mla_case, with_cache):
    """Folding k_b into the query and v_b after attention is the same function. With a
    cache, slots 0..2 already hold (random) entries and the new tokens go to slots 3..9."""
    cfg, w, x, positions, cos, sin, s = mla_case

    @jax.jit
    def run(x, cache, absorbed):
        if cache is None:
            mask = attention.attention_mask(positions - 3, jnp.arange(x.shape[1]))
            return attention.mla(w, x, cos, sin, mask, cfg, absorbed=absorbed)[0]
        mask = attention.attention_mask(positions, jnp.arange(s))
        start = jnp.full((x.shape[0],), 3, jnp.int32)
        return attention.mla(w, x, cos, sin, mask, cfg, cache, start, absorbed=absorbed)[0]

    cache = None
    if with_cache:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        cache = MLACache(jax.random.normal(jax.random.key(4), (x.shape[0], s, width)))
    naive = run(x, cache, False)
    absorbed = run(x, cache, True)
    assert float(jnp.abs(naive).max()) > 0.1
    err = max_abs_diff(naive, absorbed)
    assert err < 1e-5, f"absorbed MLA differs from naive by {err:.3g}"


# Sharding -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    return r1jax.make_mesh("fsdp=2,tensor=2,expert=2")


def test_init_on_mesh_is_sharded_and_equals_single_device(mesh):
    cfg, params = _tiny_dense()
    sharded = r1jax.init_params(jax.random.key(0), cfg, mesh=mesh)
    q = sharded.dense_layers.attn.q
    assert q.sharding.mesh.shape == mesh.shape
    assert tuple(q.sharding.spec)[1:3] == ("fsdp", "tensor")
    assert len(q.sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_sharded_forward_equals_single_device(mesh, name):
    cfg, params = MODELS[name]()
    sharded = jax.device_put(params, transformer.param_shardings(cfg, mesh))
    if name == "moe":
        assert "expert" in tuple(sharded.moe_layers.mlp.gate.sharding.spec)
        assert "tensor" in tuple(sharded.moe_layers.mlp.gate.sharding.spec)
        assert not sharded.moe_layers.mlp.gate.sharding.is_fully_replicated
    assert not sharded.embed.sharding.is_fully_replicated
    tokens = random_tokens(4)
    single = r1jax.forward(params, tokens, cfg)
    multi = r1jax.forward(sharded, tokens, cfg, mesh_rules=r1jax.MeshRules(mesh))
    assert len(multi.logits.sharding.device_set) == 8
    err = max_abs_diff(single.logits, multi.logits)
    assert err < 1e-5, f"{name}: sharded forward differs by {err:.3g}"
    if single.mtp_logits is not None:
        assert max_abs_diff(single.mtp_logits, multi.mtp_logits) < 1e-5


# MTP ------------------------------------------------------------------------------------

def test_mtp_logits_shape_and_loss():
    cfg, params = _tiny_moe()
    tokens = random_tokens(1)
    out = r1jax.forward(params, tokens, cfg)
    assert out.mtp_logits.shape == (B, T, cfg.vocab_size)
    assert out.mtp_logits.dtype == jnp.float32
    loss = mtp.mtp_loss(out.mtp_logits, tokens)
    # hand: mean over i < T-2 of -log softmax(mtp_logits[:, i])[tokens[:, i + 2]]
    logp = jax.nn.log_softmax(np.asarray(out.mtp_logits, np.float64)[:, :-2], -1)
    want = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(tokens)[:, 2:, None], -1))
    assert abs(float(loss) - want) < 1e-5
    assert r1jax.forward(params, tokens, cfg, with_mtp=False).mtp_logits is None


# Init -----------------------------------------------------------------------------------

def test_seed_determinism():
    cfg, params = _tiny_dense()
    again = r1jax.init_params(jax.random.key(0), cfg)
    other = r1jax.init_params(jax.random.key(1), cfg)
    random_leaves = 0
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(again), jax.tree.leaves(other)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if np.ptp(np.asarray(a)) > 0:  # drawn at random (not a ones/zeros init)
            random_leaves += 1
            assert not np.any(np.asarray(a) == np.asarray(c))
    assert random_leaves >= 8


def test_init_statistics():
    """fan-in init: std 1/sqrt(fan_in) for the projections; norms start at one."""
    cfg, params = _tiny_moe()
    q_a = np.asarray(params.dense_layers.attn.q_a)
    assert abs(q_a.std() * np.sqrt(cfg.hidden_size) - 1) < 0.1
    gate = np.asarray(params.moe_layers.mlp.gate)
    assert gate.shape == (cfg.num_moe_layers, cfg.n_routed_experts, cfg.hidden_size,
                          cfg.moe_intermediate_size)
    assert abs(gate.std() * np.sqrt(cfg.hidden_size) - 1) < 0.1
    assert not np.array_equal(gate[0, 0], gate[0, 1])  # experts drawn independently
    assert not np.array_equal(gate[0], gate[1])  # layers drawn independently
    np.testing.assert_array_equal(np.asarray(params.final_norm), 1.0)
    assert params.moe_layers.mlp.router_bias.dtype == jnp.float32


def test_deepseek_v3_671b_parameter_count():
    """671B main model (as DeepSeek reports) and an MTP module of 11.6B beyond the shared
    embedding and head, from shapes alone (nothing allocated)."""
    cfg = r1jax.configs.deepseek_v3_671b()
    shapes = jax.eval_shape(lambda k: r1jax.init_params(k, cfg, with_mtp=False), jax.random.key(0))
    main = sum(x.size for x in jax.tree.leaves(shapes))
    with_mtp = sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(lambda k: r1jax.init_params(k, cfg), jax.random.key(0))))
    assert abs(main - 671.03e9) < 0.005e9, main
    assert abs((with_mtp - main) - 11.61e9) < 0.01e9, with_mtp - main
    assert r1jax.param_count(cfg) == main
    assert r1jax.param_count(cfg, with_mtp=True) == with_mtp
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(shapes) if x.ndim > 1)


# Remat, dtypes --------------------------------------------------------------------------

def _loss(params, tokens, cfg):
    out = r1jax.forward(params, tokens, cfg)
    return (next_token_loss(out.logits, tokens) + mtp.mtp_loss(out.mtp_logits, tokens)
            + out.aux["balance_loss"])


def _has_primitive(jaxpr, name):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for sub in jax.core.jaxprs_in_params(eqn.params):
            if _has_primitive(sub, name):
                return True
    return False


def test_remat_gives_same_gradients():
    cfg, params = _tiny_moe()
    tokens = random_tokens(5)
    remat_cfg = cfg.replace(remat=True)
    assert _has_primitive(jax.make_jaxpr(lambda p: _loss(p, tokens, remat_cfg))(params).jaxpr,
                          "checkpoint")
    assert not _has_primitive(jax.make_jaxpr(lambda p: _loss(p, tokens, cfg))(params).jaxpr,
                              "checkpoint")
    grad = jax.jit(jax.grad(_loss), static_argnums=2)
    g0, g1 = grad(params, tokens, cfg), grad(params, tokens, remat_cfg)
    paths = jax.tree_util.tree_flatten_with_path(g0)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(g0.moe_layers.mlp.gate).max()) > 0  # experts get gradients
    assert float(jnp.abs(g0.moe_layers.mlp.router).max()) > 0  # so does the router


def test_bfloat16_runs_close_to_float32():
    cfg, params = _tiny_moe()
    bf_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree_util.tree_map_with_path(
        lambda path, a: a if "router_bias" in jax.tree_util.keystr(path) else a.astype(jnp.bfloat16),
        params)
    tokens = random_tokens(6)
    ref = r1jax.forward(params, tokens, cfg)
    out = r1jax.forward(bf_params, tokens, bf_cfg)
    assert out.logits.dtype == jnp.float32
    assert out.aux["final_hidden"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.logits))) and bool(jnp.all(jnp.isfinite(out.mtp_logits)))
    diff = np.abs(np.asarray(out.logits) - np.asarray(ref.logits))
    scale = float(np.asarray(ref.logits).std())
    assert diff.mean() < 0.05 * scale, (diff.mean(), scale)
    assert diff.max() > 0  # it really ran in lower precision
