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
from r1jax.model import attention, layers, mtp, rope, transformer
from r1jax.model.cache import MLACache

from model_fixtures import B, T, distinct_tokens, layer, max_abs_diff, random_tokens
from model_fixtures import dense_init as _dense_init
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
    """Forward-mode derivative of the logits with respect to the input embeddings of row r
    at positions >= k (for every r and every cut k): exactly 0 at positions < k and in
    the other row, non-zero at positions >= k of row r. Each token occurs once in the
    batch, so perturbing a token's embedding-table row perturbs one position's input.
    For tiny_moe the MTP logits at t see token t + 1, so they move from position k - 1."""
    name, cfg, params = model
    cfg, params = _untied(cfg, params)
    tokens = distinct_tokens(0, (B, T))
    flat = np.asarray(tokens)
    assert len(set(flat.ravel().tolist())) == B * T
    probe = jax.random.normal(jax.random.key(7), (cfg.vocab_size,))
    cases = [(r, k) for r in range(B) for k in range(1, T)]
    noise = np.asarray(jax.random.normal(jax.random.key(8), params.embed.shape))
    tangents = np.zeros((len(cases), *params.embed.shape), np.float32)
    for i, (r, k) in enumerate(cases):
        tangents[i, flat[r, k:]] = noise[flat[r, k:]]

    @jax.jit
    def directional(params, tangents):
        def per_position(embed):
            out = r1jax.forward(dataclasses.replace(params, embed=embed), tokens, cfg)
            heads = [out.logits @ probe]
            if out.mtp_logits is not None:
                heads.append(out.mtp_logits @ probe)
            return jnp.stack(heads)  # [heads, b, t]
        return jax.vmap(lambda tan: jax.jvp(per_position, (params.embed,), (tan,))[1])(tangents)

    moved = np.abs(np.asarray(directional(params, jnp.asarray(tangents))))  # [case, heads, b, t]
    assert moved.shape[1] == (2 if name == "moe" else 1)
    for i, (r, k) in enumerate(cases):
        for head in range(moved.shape[1]):
            first = k - head  # main logits move from k, MTP logits from k - 1
            m = moved[i, head]
            assert np.all(m[1 - r] == 0), f"{name}: row {1 - r} depends on row {r} (head {head})"
            assert np.all(m[r, :first] == 0), (
                f"{name} head {head}: positions < {first} depend on tokens >= {k}")
            assert np.all(m[r, first:] > 0), (
                f"{name} head {head}: positions >= {first} ignore tokens >= {k}")


def test_later_tokens_do_not_change_earlier_logits(model):
    """Changing tokens 7.. leaves the logits at 0..6 bit for bit unchanged (and the MTP
    logits at 0..5, which read one token ahead)."""
    name, cfg, params = model
    tokens = random_tokens(1)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 11) % cfg.vocab_size)
    a = r1jax.forward(params, tokens, cfg)
    b = r1jax.forward(params, changed, cfg)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :7]), np.asarray(b.logits[:, :7]))
    assert max_abs_diff(a.logits[:, 7:], b.logits[:, 7:]) > 1e-3  # the change is seen later
    if a.mtp_logits is not None:  # MTP at i reads token i + 1
        np.testing.assert_array_equal(np.asarray(a.mtp_logits[:, :6]),
                                      np.asarray(b.mtp_logits[:, :6]))
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
    """Through a KV cache of 12 slots, each step's logits equal the no-cache forward's
    logits at those positions. tiny_dense: prefill 5 tokens, then one token at a time.
    tiny_moe: three chunks of 4 (multi-token writes at non-zero offsets, one compiled
    shape; prefill + token-by-token for MLA + MoE is checked against transformers in
    test_parity)."""
    name, cfg, params = model
    tokens = random_tokens(3)
    full = r1jax.forward(params, tokens, cfg).logits
    bounds = [0, 4, 8, 12] if name == "moe" else [0, 5, *range(6, T + 1)]
    cache = r1jax.init_cache(cfg, B, T)
    steps = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out = r1jax.forward(params, tokens[:, lo:hi], cfg, cache=cache)
        assert out.mtp_logits is None
        np.testing.assert_array_equal(np.asarray(out.cache.lengths), [hi, hi])
        cache = out.cache
        steps.append(out.logits)
    err = max_abs_diff(jnp.concatenate(steps, axis=1), full)
    assert err < 1e-5, f"{name}: cached decode differs from the full forward by {err:.3g}"


@pytest.mark.parametrize("untie", [False, True])
def test_out_major_projections_equal_plain_weights(model, untie):
    """The sampler's CPU decode layout (`unstack_layers` + `out_major_projections`:
    projections and head stored [out, in], `linear` running [out, in] x [in, rows]) gives
    the logits of the stacked plain weights, prefill and one-token steps through a cache;
    tied and untied heads, GQA and MLA (with query compression) + MoE shared experts."""
    name, cfg, params = model
    if untie:
        cfg, params = _untied(cfg, params)
    with pytest.raises(ValueError, match="split layer stacks"):
        transformer.out_major_projections(params)
    decode = transformer.out_major_projections(transformer.unstack_layers(params, experts=True))
    assert isinstance(decode.lm_head, layers.OutMajor)
    first = (decode.dense_layers or decode.moe_layers)[0]
    assert isinstance(first.attn.o, layers.OutMajor) and first.attn.o.in_shape == (
        cfg.num_attention_heads, cfg.v_head_dim if cfg.is_mla else cfg.head_dim)
    again = transformer.out_major_projections(decode)  # converting twice copies nothing
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(decode)))
    tokens = random_tokens(4)
    logits = {}
    for label, p in (("plain", params), ("out-major", decode)):
        cache, steps = r1jax.init_cache(cfg, B, T), []
        for lo, hi in zip([0, 5, 6, 7], [5, 6, 7, 8]):
            out = r1jax.forward(p, tokens[:, lo:hi], cfg, cache=cache, with_mtp=False)
            cache = out.cache
            steps.append(out.logits)
        logits[label] = jnp.concatenate(steps, axis=1)
    err = max_abs_diff(logits["out-major"], logits["plain"])
    assert err < 1e-5, f"{name}: out-major decode differs from plain weights by {err:.3g}"


def test_causal_chunks_equal_cached_decode(model, monkeypatch):
    """Without a cache, attention runs over chunks of query rows, each scoring only the
    keys up to its last row. With chunks of 5 rows (13 = 5 + 5 + 3; a shape of its own,
    so nothing compiled before is reused), the full forward equals a token-by-token
    decode through the cache, which scores every slot, and packed segments still see
    only themselves."""
    name, cfg, params = model
    monkeypatch.setattr(attention, "CAUSAL_CHUNK_ROWS", 5)
    tokens = random_tokens(4, (B, 13))
    full = r1jax.forward(params, tokens, cfg).logits
    cache = r1jax.init_cache(cfg, B, 13)
    steps = []
    for i in range(13):
        out = r1jax.forward(params, tokens[:, i:i + 1], cfg, cache=cache)
        cache = out.cache
        steps.append(out.logits)
    err = max_abs_diff(jnp.concatenate(steps, axis=1), full)
    assert err < 1e-5, f"{name}: chunked attention differs from cached decode by {err:.3g}"
    segments = jnp.asarray([[1] * 7 + [2] * 6] * B)  # the second segment starts mid-chunk
    packed = r1jax.forward(params, tokens, cfg, segment_ids=segments).logits
    alone = r1jax.forward(params, tokens[:, 7:], cfg).logits
    assert max_abs_diff(packed[:, 7:], alone) < 1e-5
    assert max_abs_diff(packed[:, :7], full[:, :7]) < 1e-5


def test_flash_attention_wiring_equals_einsum_path(model, monkeypatch):
    """attention_impl='cudnn' hands queries, keys, values (MLA's padded to the key size),
    the mask and the causal flag to `jax.nn.dot_product_attention`. Its cuDNN kernel needs
    a GPU; here its XLA implementation stands in, so this checks the wiring: the same
    logits and gradients as the einsum path without a cache, with packed segments, and
    through a cache (prefills of 4 tokens at offsets 0, 4, 8; MLA then non-absorbed)."""
    name, cfg, params = model
    calls = []
    real = jax.nn.dot_product_attention

    def stand_in(*args, **kw):
        calls.append(kw["implementation"])
        return real(*args, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    monkeypatch.setattr(attention, "FLASH_MIN_CACHED_QUERIES", 4)  # the prefills below
    flash = cfg.replace(attention_impl="cudnn")
    tokens = random_tokens(5, (B, 12))
    segments = jnp.asarray([[1] * 6 + [2] * 6] * B)
    for kw in ({"segment_ids": segments}, {}):
        want, got = (r1jax.forward(params, tokens, c, **kw).logits for c in (cfg, flash))
        assert max_abs_diff(got, want) < 1e-5, kw
    assert calls and set(calls) == {"cudnn"}
    n_calls = len(calls)
    cache = r1jax.init_cache(flash, B, 12)
    steps = []
    for lo in (0, 4, 8):
        out = r1jax.forward(params, tokens[:, lo:lo + 4], flash, cache=cache)
        cache = out.cache
        steps.append(out.logits)
    assert max_abs_diff(jnp.concatenate(steps, axis=1), want) < 1e-5
    assert len(calls) > n_calls  # the prefills went through it too (counted as traced)

    def loss(p, c):
        return jnp.sum(jnp.sin(r1jax.forward(p, tokens, c, with_mtp=False).logits))

    g_want, g_got = (jax.grad(loss)(params, c) for c in (cfg, flash))
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, atol=1e-6 * float(np.abs(b).max()) + 1e-6, rtol=1e-3)


def test_flash_attention_choice():
    cfg = r1jax.configs.tiny_dense(dtype="bfloat16")
    assert not attention.flash_attention_applies(cfg, 64, 16, 16)  # 'auto' on CPU: XLA
    forced = cfg.replace(attention_impl="cudnn")
    assert attention.flash_attention_applies(forced, 64, 16, 16)
    assert not attention.flash_attention_applies(forced, 64, 1, 16)  # decode stays XLA's
    assert not attention.flash_attention_applies(forced, 64, 15, 15)  # odd: cuDNN's limit
    assert not attention.flash_attention_applies(forced, 64, 2, 16, cached=True)  # verify step
    assert attention.flash_attention_applies(forced, 64, 16, 64, cached=True)  # a prefill
    with pytest.raises(ValueError, match="attention_impl"):
        cfg.replace(attention_impl="flash")


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

    def run(x, cache, absorbed):
        if cache is None:
            mask = attention.attention_mask(positions - 3, jnp.arange(x.shape[1]))
            return attention.mla(w, x, cos, sin, mask, cfg, absorbed=absorbed)[0]
        mask = attention.attention_mask(positions, jnp.arange(s))
        start = jnp.full((x.shape[0],), 3, jnp.int32)
        return attention.mla(w, x, cos, sin, mask, cfg, cache, start, absorbed=absorbed)[0]

    run = jax.jit(run, static_argnums=2)
    cache = None
    if with_cache:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        cache = MLACache(jax.random.normal(jax.random.key(4), (x.shape[0], s, width)))
    naive = run(x, cache, False)
    absorbed = run(x, cache, True)
    assert float(jnp.abs(naive).max()) > 0.1
    err = max_abs_diff(naive, absorbed)
    assert err < 1e-5, f"absorbed MLA differs from naive by {err:.3g}"


def test_cached_mla_absorbs_for_few_queries_only():
    """With a cache, MLA picks the form with fewer FLOPs: absorbed for decode steps and
    short drafts over a long cache, per-head keys and values for a long continuation of a
    short cached prompt (GRPO's completions after their shared prompt)."""
    v3 = r1jax.configs.deepseek_v3_671b()
    assert attention._absorbed_is_cheaper(v3, 1, 4096) and attention._absorbed_is_cheaper(v3, 3, 4096)
    assert not attention._absorbed_is_cheaper(v3, 128, 192)


# Sharding -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
    return r1jax.make_mesh("fsdp=2,tensor=2,expert=2")


@pytest.fixture(scope="module")
def dense_on_mesh(mesh):
    cfg, _ = _tiny_dense()
    return r1jax.init_params(jax.random.key(0), cfg, mesh=mesh)


def test_init_on_mesh_is_sharded(mesh, dense_on_mesh):
    q = dense_on_mesh.dense_layers.attn.q  # [layers, d, heads, head_dim]
    assert q.sharding.mesh.shape == mesh.shape
    assert tuple(q.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert len(q.sharding.device_set) == 8
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert tuple(dense_on_mesh.embed.sharding.spec) == ("tensor", "fsdp")


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_sharded_forward_equals_single_device(mesh, dense_on_mesh, name):
    """tiny_dense: created on the mesh by init_params; tiny_moe: put into the shardings its
    declarations give (experts over `expert`, expert hidden over `tensor`)."""
    cfg, params = MODELS[name]()
    if name == "moe":
        sharded = jax.device_put(params, transformer.param_shardings(cfg, mesh))
        gate = sharded.moe_layers.mlp.gate  # [layers, experts, d, f]
        assert tuple(gate.sharding.spec) == (None, "expert", "fsdp", "tensor")
        assert gate.addressable_shards[0].data.shape == (2, 4, 32, 16)
    else:  # drawn on the mesh (per-weight draws): compare with the same values on one device
        sharded = dense_on_mesh
        params = jax.device_get(dense_on_mesh)
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
    # by hand: mean over i < T - 2 of -log softmax(mtp_logits[:, i])[tokens[:, i + 2]]
    logits = np.asarray(out.mtp_logits, np.float64)[:, :-2]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.asarray(tokens)[:, 2:, None], -1)[..., 0]
    assert abs(float(loss) - np.mean(logz - picked)) < 1e-5
    no_mtp = jax.eval_shape(lambda p: r1jax.forward(p, tokens, cfg, with_mtp=False), params)
    assert no_mtp.mtp_logits is None


# Init -----------------------------------------------------------------------------------

def test_seed_determinism(mesh, dense_on_mesh):
    """Same key: identical values (twice on one device, twice on an 8-device mesh); another
    key: every randomly drawn weight differs. (One device draws all weights in one go, a
    mesh draws each weight on its own, so the two modes give different values.)"""
    cfg, params = _tiny_dense()
    again, other = _dense_init(jax.random.key(0)), _dense_init(jax.random.key(1))
    mesh_again = r1jax.init_params(jax.random.key(0), cfg, mesh=mesh)
    for m, n in zip(jax.tree.leaves(dense_on_mesh), jax.tree.leaves(mesh_again)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(n))
    random_leaves = 0
    for a, b, c in zip(*(jax.tree.leaves(t) for t in (params, again, other))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if np.ptp(np.asarray(a)) > 0:  # drawn at random (not a ones/zeros init)
            random_leaves += 1
            assert not np.any(np.asarray(a) == np.asarray(c))
    assert random_leaves == 8  # embed; q, k, v, o; gate, up, down


def test_init_statistics():
    """fan-in init: std 1/sqrt(fan_in); layers drawn independently; norms one, biases zero."""
    cfg, params = _tiny_dense()
    d = cfg.hidden_size
    q = np.asarray(params.dense_layers.attn.q)
    o = np.asarray(params.dense_layers.attn.o)  # [l, n, h, d]: fan-in n * h
    down = np.asarray(params.dense_layers.mlp.down)
    assert abs(q.std() * np.sqrt(d) - 1) < 0.05
    assert abs(o.std() * np.sqrt(o.shape[1] * o.shape[2]) - 1) < 0.05
    assert abs(down.std() * np.sqrt(cfg.intermediate_size) - 1) < 0.05
    assert abs(np.asarray(params.embed).std() * np.sqrt(d) - 1) < 0.05  # tied: std d**-0.5
    assert not np.array_equal(q[0], q[1])
    np.testing.assert_array_equal(np.asarray(params.final_norm), 1.0)
    np.testing.assert_array_equal(np.asarray(params.dense_layers.attn.q_bias), 0.0)
    assert params.lm_head is None and params.mtp is None


def test_init_shapes_of_moe_model():
    """Structure of init_params for MLA + MoE + MTP, from shapes alone."""
    cfg = r1jax.configs.tiny_moe()
    shapes = jax.eval_shape(lambda k: r1jax.init_params(k, cfg), jax.random.key(0))
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert shapes.moe_layers.mlp.gate.shape == (cfg.num_moe_layers, e, d, f)
    assert shapes.moe_layers.mlp.down.shape == (cfg.num_moe_layers, e, f, d)
    assert shapes.moe_layers.mlp.router_bias.dtype == jnp.float32
    dense_gate = (cfg.first_k_dense_replace, d, cfg.intermediate_size)
    assert shapes.dense_layers.mlp.gate.shape == dense_gate
    assert shapes.mtp.eh_proj.shape == (2 * d, d)
    assert shapes.mtp.block.mlp.gate.shape == (e, d, f)  # the MTP block is a MoE block
    assert jax.tree.structure(shapes) == jax.tree.structure(_tiny_moe()[1])


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
    assert shapes.moe_layers.mlp.gate.shape == (58, 256, 7168, 2048)
    assert shapes.moe_layers.mlp.gate.dtype == jnp.bfloat16


# Remat, dtypes --------------------------------------------------------------------------

def _has_matmul(jaxpr):
    from jax.extend.core import jaxprs_in_params
    return any(eqn.primitive.name == "dot_general"
               or any(_has_matmul(sub) for sub in jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


def _has_remat(jaxpr):
    """A rematerialised region holding matmuls: a layer (the SwiGLU activation alone is
    always rematerialised)."""
    from jax.extend.core import jaxprs_in_params
    for eqn in jaxpr.eqns:
        subs = jaxprs_in_params(eqn.params)
        remat = eqn.primitive.name.startswith(("remat", "checkpoint"))
        if remat and any(_has_matmul(s) for s in subs):
            return True
        if any(_has_remat(sub) for sub in subs):
            return True
    return False


@pytest.mark.parametrize("name", ["moe", "dense"])
def test_remat_is_applied(name):
    cfg, params = MODELS[name]()
    tokens = random_tokens(5)
    for remat in (False, True):
        c = cfg.replace(remat=remat)
        jaxpr = jax.make_jaxpr(lambda p: r1jax.forward(p, tokens, c).logits)(params).jaxpr
        assert _has_remat(jaxpr) == remat


def test_remat_gives_same_gradients():
    """tiny_dense (remat wraps the same scan body for every layer kind)."""
    cfg, params = _tiny_dense()
    tokens = random_tokens(5)

    def loss(params, cfg):
        return next_token_loss(r1jax.forward(params, tokens, cfg).logits, tokens)

    # one jit for both: XLA compiles the pair in about the time of one
    both = jax.jit(lambda p: (jax.grad(loss)(p, cfg), jax.grad(loss)(p, cfg.replace(remat=True))))
    g0, g1 = both(params)
    paths = jax.tree_util.tree_flatten_with_path(g0)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(g1)):
        assert float(jnp.abs(a).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))


def test_bfloat16_runs_close_to_float32():
    """bfloat16 weights and activations (tiny_dense; the MoE layer in bfloat16 is checked
    in test_moe): float32 logits, bfloat16 residual stream, finite and close to float32."""
    cfg, params = _tiny_dense()
    bf_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    tokens = random_tokens(6)
    ref = r1jax.forward(params, tokens, cfg)
    out = r1jax.forward(bf_params, tokens, bf_cfg)
    assert out.logits.dtype == jnp.float32
    assert out.aux["final_hidden"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.logits)))
    diff = np.abs(np.asarray(out.logits) - np.asarray(ref.logits))
    scale = float(np.asarray(ref.logits).std())
    assert diff.max() < 0.1 * scale, (diff.max(), scale)
    assert diff.max() > 1e-4 * scale  # it really ran in lower precision
