"""Numeric parity with Hugging Face transformers on the fixtures in tests/fixtures/hf.

Expected values come only from the fixtures (computed by transformers in float32, see
tests/fixtures/hf/README.md). Tolerances follow the README: logits 1e-4, hidden states
1e-5 (fine enough to catch RMSNorm eps 1e-5 instead of 1e-6), identical experts.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax.model import attention, moe, rope
from r1jax.model.layers import rms_norm

from model_fixtures import ALL_FIXTURES, DEEPSEEK_FIXTURES, FIXTURES, fixture, layer, max_abs_diff


@pytest.fixture(scope="module")
def outputs():
    """forward(..., return_hidden=True) for every fixture folder, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, params, fx = fixture(name)
            cache[name] = r1jax.forward(params, jnp.asarray(fx["forward_input_ids"]), cfg,
                                        return_hidden=True)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_loads_float32(name):
    cfg, params, _ = fixture(name)
    assert cfg.param_dtype == "float32"
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32
    assert r1jax.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["qwen2_tied", "deepseek_v3_yarn", "deepseek_v3_noqlora"])
def test_param_count_matches_transformers(name):
    """transformers counts parameters without the router correction bias (a buffer there)."""
    cfg, _, _ = fixture(name)
    meta = json.loads((FIXTURES / name / "fixture_meta.json").read_text())
    router_bias = cfg.num_moe_layers * cfg.n_routed_experts
    assert r1jax.param_count(cfg) - router_bias == meta["n_params"]


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_logits(name, outputs):
    _, _, fx = fixture(name)
    out = outputs(name)
    assert out.logits.dtype == jnp.float32
    assert out.logits.shape == fx["forward_logits"].shape
    err = max_abs_diff(out.logits, fx["forward_logits"])
    assert err < 1e-4, f"{name}: max |logits - transformers| = {err:.3g}"


@pytest.mark.parametrize("name", ["qwen2_tied", *DEEPSEEK_FIXTURES])
def test_hidden_states(name, outputs):
    cfg, _, fx = fixture(name)
    hidden = outputs(name).aux["hidden"]
    b, t = fx["forward_input_ids"].shape
    assert hidden.shape == (cfg.num_hidden_layers + 1, b, t, cfg.hidden_size)
    for i in range(cfg.num_hidden_layers + 1):
        err = max_abs_diff(hidden[i], fx["forward_hidden"][i])
        assert err < 1e-5, f"{name}: hidden state {i} differs by {err:.3g}"


@pytest.mark.parametrize("name", DEEPSEEK_FIXTURES)
def test_router_experts(name, outputs):
    cfg, _, fx = fixture(name)
    experts = np.asarray(outputs(name).aux["experts"])  # [l_moe, b, t, k]
    b, t = fx["forward_input_ids"].shape
    assert experts.shape == (cfg.num_moe_layers, b, t, cfg.num_experts_per_tok)
    got = np.sort(experts.reshape(cfg.num_moe_layers, b * t, -1), axis=-1)
    np.testing.assert_array_equal(got, fx["router_topk_idx"])


def _route_layer(cfg):
    """Routing of one MoE layer, rebuilt from the fixture's own hidden state entering it:
    h = hidden[i]; h += attention(rms_norm(h)); x = rms_norm(h, post_attention_layernorm);
    route(x). Starting from transformers' hidden state, not ours, keeps this test about
    routing alone."""
    @jax.jit
    def run(w, h_btd):
        b, t, _ = h_btd.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope.rope_angles(positions, cfg)
        mask = attention.attention_mask(positions, jnp.arange(t, dtype=jnp.int32))
        a, _ = attention.mla(w.attn, rms_norm(h_btd, w.attn_norm, cfg.rms_norm_eps), cos, sin,
                             mask, cfg)
        x = rms_norm(h_btd + a, w.mlp_norm, cfg.rms_norm_eps).reshape(b * t, -1)
        experts, weights, _ = moe.route(x, w.mlp, cfg)
        return experts, weights
    return run


@pytest.mark.parametrize("name", DEEPSEEK_FIXTURES)
def test_router_weights(name):
    cfg, params, fx = fixture(name)
    run = _route_layer(cfg)
    for j in range(cfg.num_moe_layers):
        h = jnp.asarray(fx["forward_hidden"][cfg.first_k_dense_replace + j])
        experts, weights = (np.asarray(a) for a in run(layer(params.moe_layers, j), h))
        order = np.argsort(experts, axis=-1)
        experts = np.take_along_axis(experts, order, -1)
        weights = np.take_along_axis(weights, order, -1)
        np.testing.assert_array_equal(experts, fx["router_topk_idx"][j])
        err = max_abs_diff(weights, fx["router_topk_weight"][j])
        assert err < 1e-5, f"{name}: MoE layer {j} gate weights differ by {err:.3g}"


@pytest.mark.parametrize("name", ["qwen2_tied", "deepseek_v3_yarn"])
def test_cached_decode_matches_transformers_generation(name):
    """Row 1 of the generation prompts has no padding: prefill it into a KV cache, then
    feed transformers' greedy tokens one at a time; every step's logits must match the
    logits transformers' cached decode produced (and their argmax its tokens)."""
    cfg, params, fx = fixture(name)
    prompt = jnp.asarray(fx["gen_prompt_ids"][1:2])
    assert fx["gen_prompt_attention_mask"][1].all()
    new = fx["gen_new_tokens"][1:2]
    steps = new.shape[1]
    cache = r1jax.init_cache(cfg, 1, prompt.shape[1] + steps)
    out = r1jax.forward(params, prompt, cfg, cache=cache)
    logits = [out.logits[:, -1]]
    for i in range(steps - 1):
        out = r1jax.forward(params, jnp.asarray(new[:, i:i + 1]), cfg, cache=out.cache)
        logits.append(out.logits[:, -1])
    logits = np.stack([np.asarray(x) for x in logits], axis=1)
    err = max_abs_diff(logits, fx["gen_step_logits"][1:2])
    assert err < 1e-4, f"{name}: cached decode logits differ from transformers by {err:.3g}"
    np.testing.assert_array_equal(logits.argmax(-1), new)
    assert int(out.cache.lengths[0]) == prompt.shape[1] + steps - 1
