"""ModelConfig: Hugging Face config.json reading (both RoPE spellings), validation
messages, round trips, presets, and RoPE/YaRN values computed by hand."""
import json
import math

import numpy as np
import pytest

from r1jax import configs
from r1jax.configs import ModelConfig, RopeScaling
from r1jax.model import rope

from model_fixtures import FIXTURES


def _hf(name):
    return json.loads((FIXTURES / name / "config.json").read_text())


def test_reads_both_rope_spellings():
    """transformers 5 writes `rope_parameters` (holding rope_theta); DeepSeek's own
    checkpoints write `rope_scaling` with `type: yarn` and a top-level `rope_theta`."""
    new = _hf("deepseek_v3_yarn")
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = new["rope_parameters"]
    old["rope_theta"] = params["rope_theta"]
    old["rope_scaling"] = {"type": "yarn", **{k: v for k, v in params.items()
                                              if k not in ("rope_theta", "rope_type")}}
    a, b = configs.from_hf_config(new), configs.from_hf_config(old)
    assert a == b
    assert a.rope_scaling == RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64,
                                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    assert a.rope_theta == 10000.0
    # the same with a theta that is not the default, to see it is read from each place
    new["rope_parameters"] = {**params, "rope_theta": 50000.0}
    old["rope_theta"] = 50000.0
    assert configs.from_hf_config(new).rope_theta == 50000.0
    assert configs.from_hf_config(old).rope_theta == 50000.0


def test_reads_fixture_configs():
    ds = configs.from_hf_config(_hf("deepseek_v3_yarn"))
    assert (ds.model_type, ds.hidden_size, ds.num_hidden_layers) == ("deepseek_v3", 64, 3)
    assert ds.qk_head_dim == 24 and ds.qk_rope_head_dim == 8  # config.json's head_dim is 8
    assert (ds.q_lora_rank, ds.kv_lora_rank, ds.v_head_dim) == (32, 16, 16)
    assert (ds.n_routed_experts, ds.num_experts_per_tok, ds.n_group, ds.topk_group) == (8, 2, 2, 1)
    assert ds.routed_scaling_factor == 2.5 and ds.norm_topk_prob and ds.rope_interleave
    assert ds.scoring_func == "sigmoid" and ds.topk_method == "noaux_tc"
    assert ds.num_dense_layers == 1 and ds.num_moe_layers == 2
    assert ds.eos_token_id == (1,) and ds.bos_token_id == 0
    assert configs.from_hf_config(_hf("deepseek_v3_noqlora")).q_lora_rank is None
    qw = configs.from_hf_config(_hf("qwen2_tied"))
    assert qw.tie_word_embeddings and qw.attention_bias and qw.num_kv_heads == 2
    assert qw.gqa_head_dim == 16 and qw.rope_scaling.rope_type == "default"
    assert qw.num_dense_layers == 2 and qw.num_moe_layers == 0


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(num_experts_per_tok=5, topk_group=1), "num_experts_per_tok"),  # > topk_group * 4
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(moe_matmul="einsum"), "moe_matmul"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_invalid_moe_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={changes[field]!r}"):
        configs.tiny_moe(**changes)


@pytest.mark.parametrize("changes, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(intermediate_size=0), "intermediate_size"),
])
def test_invalid_dense_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}={changes[field]!r}"):
        configs.tiny_dense(**changes)


def test_invalid_rope_scaling():
    with pytest.raises(ValueError, match="rope_type='ntk'"):
        RopeScaling("ntk")
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling("yarn", factor=4.0)
    with pytest.raises(ValueError, match="RopeScaling.factor"):
        RopeScaling("llama3", factor=0.0, original_max_position_embeddings=8)
    hf = _hf("deepseek_v3_yarn")
    hf["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match="unsupported RoPE type 'dynamic'"):
        configs.from_hf_config(hf)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        configs.from_hf_config({**hf, "model_type": "gpt2"})


def test_config_is_frozen_and_hashable():
    cfg = configs.tiny_moe()
    assert hash(cfg) == hash(configs.tiny_moe()) and cfg == configs.tiny_moe()
    with pytest.raises(Exception):
        cfg.hidden_size = 8
    assert cfg.replace(hidden_size=128).hidden_size == 128 and cfg.hidden_size == 64
    assert configs.tiny_moe(eos_token_id=5).eos_token_id == (5,)


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_presets_construct_and_round_trip_through_hf_config(name):
    cfg = configs.preset(name)
    assert isinstance(cfg, ModelConfig)
    hf = json.loads(json.dumps(configs.to_hf_config(cfg)))  # JSON-serialisable
    # config.json carries the storage dtype, not the activation dtype: pass both back
    back = configs.from_hf_config(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if not cfg.is_mla:
        back = back.replace(head_dim=cfg.head_dim)  # 0 (implicit) and explicit are the same
    assert back == cfg
    assert hf["architectures"] == [configs._ARCHITECTURES[cfg.model_type]]


@pytest.mark.parametrize("name", ["deepseek_v3_671b", "qwen2_5_0_5b", "llama3_1_8b"])
def test_preset_overrides_any_field(name):
    """`preset(name, field=value)` for command-line flags: overriding a field the preset
    itself sets (here the depth) must work, as it does for tiny_moe."""
    assert configs.preset(name, num_hidden_layers=4).num_hidden_layers == 4


def test_tiny_preset_overrides_any_field():
    assert configs.preset("tiny_moe", num_hidden_layers=4).num_hidden_layers == 4


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        configs.preset("gpt5")


def test_preset_shapes():
    v3 = configs.deepseek_v3_671b()
    assert (v3.num_dense_layers, v3.num_moe_layers, v3.experts_per_group) == (3, 58, 32)
    assert configs.preset("deepseek_r1_671b") == v3
    lite = configs.deepseek_v2_lite_16b()
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax"


# RoPE values --------------------------------------------------------------------------------

def test_yarn_inverse_frequencies_of_fixture():
    """README (dev fixture values): inv_freq = [1, 0.0625, 0.0025, 0.00025]. By hand:
    base 1e4^(-2i/8) = [1, .1, .01, .001]; low = max(floor(8 ln(64/(32 2pi)) / (2 ln 1e4)), 0)
    = 0; high = ceil(8 ln(64/(1 2pi)) / (2 ln 1e4)) = ceil(1.008) = 2; ramp = [0, .5, 1, 1];
    inv = base/4 * ramp + base * (1 - ramp) = [1, .0625, .0025, .00025]."""
    cfg = configs.from_hf_config(_hf("deepseek_v3_yarn"))
    inv, attention_factor = rope.inverse_frequencies(cfg)
    np.testing.assert_allclose(inv, [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-6)
    assert attention_factor == 1.0  # mscale / mscale_all_dim = 1 / 1


def test_yarn_softmax_scale_of_fixture():
    """qk_head_dim**-0.5 * (0.1 * 1 * ln 4 + 1)**2 = 0.2646 (README); plain 24**-0.5 = 0.2041."""
    cfg = configs.from_hf_config(_hf("deepseek_v3_yarn"))
    assert abs(cfg.softmax_scale - 24 ** -0.5 * (0.1 * math.log(4) + 1) ** 2) < 1e-12
    assert abs(cfg.softmax_scale - 0.2646) < 5e-5
    plain = configs.from_hf_config(_hf("deepseek_v3_noqlora"))
    assert abs(plain.softmax_scale - 0.2041) < 5e-5


def test_yarn_attention_factor_with_unequal_mscales():
    """V2-Lite: mscale = mscale_all_dim = 0.707 -> cos/sin factor 1; with mscale 1 and
    mscale_all_dim 0 the factor is 0.1 ln 40 + 1 = 1.3689 and the softmax scale is plain."""
    lite = configs.deepseek_v2_lite_16b()
    assert rope.inverse_frequencies(lite)[1] == pytest.approx(1.0)
    assert lite.softmax_scale == pytest.approx(192 ** -0.5 * (0.0707 * math.log(40) + 1) ** 2)
    cfg = lite.replace(rope_scaling=RopeScaling(
        "yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.0))
    assert rope.inverse_frequencies(cfg)[1] == pytest.approx(0.1 * math.log(40) + 1)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5)


def test_default_and_llama3_inverse_frequencies():
    """Default: theta^(-2i/d). Llama 3 (factor 8, low 1, high 4, original 64): wavelengths
    2 pi / f below 64/4 = 16 keep f, above 64/1 = 64 use f/8, in between interpolate with
    smooth = (64/wavelen - 1) / 3."""
    qw = configs.from_hf_config(_hf("qwen2_tied"))
    np.testing.assert_allclose(rope.inverse_frequencies(qw)[0],
                               1e4 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    cfg = configs.tiny_dense(model_type="llama", rope_scaling=RopeScaling(
        "llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0,
        high_freq_factor=4.0))
    base = 1e4 ** (-np.arange(0, 16, 2) / 16)
    want = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 16:
            want.append(f)
        elif wavelen > 64:
            want.append(f / 8)
        else:
            smooth = (64 / wavelen - 1) / 3
            want.append((1 - smooth) * f / 8 + smooth * f)
    got, factor = rope.inverse_frequencies(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert factor == 1.0
    assert got[0] == 1.0 and got[-1] == pytest.approx(base[-1] / 8)  # both regimes occur
    assert any(16 <= 2 * math.pi / f <= 64 for f in base)  # and the interpolated one
