"""Model configuration: one frozen, validated dataclass and preset functions.

Field names follow Hugging Face's `config.json` (which follows the DeepSeek and Qwen
papers' code), so a reader can check every value against the source. `from_hf_config`
reads a `config.json` dict; `to_hf_config` writes one back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
MOE_MATMULS = ("auto", "blocks", "grouped", "ragged_dot")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


def _check(condition: bool, field: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"ModelConfig.{field}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is 'default', 'yarn' or 'llama3'.

    YaRN (DeepSeek-V2/V3): `factor`, `original_max_position_embeddings`, `beta_fast`,
    `beta_slow`, `mscale`, `mscale_all_dim`. Llama 3: `factor`, `low_freq_factor`,
    `high_freq_factor`, `original_max_position_embeddings`.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.rope_type not in ("default", "yarn", "llama3"):
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r}: expected 'default', 'yarn' or 'llama3'")
        if self.rope_type != "default":
            if not self.factor > 0:
                raise ValueError(f"RopeScaling.factor={self.factor!r}: expected > 0")
            if self.original_max_position_embeddings <= 0:
                raise ValueError(
                    "RopeScaling.original_max_position_embeddings="
                    f"{self.original_max_position_embeddings!r}: expected > 0 for {self.rope_type}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one model. Hashable: pass it as a static jit argument.

    `model_type` chooses the family: 'deepseek_v3' / 'deepseek_v2' (MLA attention,
    DeepSeekMoE), 'qwen2' / 'llama' (GQA attention, dense SwiGLU).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0: same as num_attention_heads
    head_dim: int = 0  # GQA head size; 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    # MLA (DeepSeek-V2/V3)
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # DeepSeekMoE
    n_routed_experts: int = 0  # 0: every layer is dense
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # 'sigmoid' (V3) or 'softmax' (V2)
    topk_method: str = "noaux_tc"  # 'noaux_tc' (V3), 'greedy' (V2-Lite), 'group_limited_greedy' (V2)
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 1e-4)
    moe_block_size: int = 0  # rows per block of the grouped matmul; 0: chosen from the shapes
    # expert products: 'blocks' (a loop over sorted, padded row blocks; CPU), 'grouped' (the
    # same layout as grouped matmuls; Pallas kernels on GPU), 'ragged_dot' (TPU), 'auto'
    moe_matmul: str = "auto"
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    # Tokens
    bos_token_id: Optional[int] = None
    eos_token_id: tuple[int, ...] = ()
    # Numerics and memory
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: bool = False  # recompute each block in the backward pass
    # Without a cache (training, scoring), run the layer stacks as an unrolled loop rather
    # than `lax.scan`: no per-layer residual stacking (XLA:CPU copies activations in and
    # out of stacked buffers; 1.1x faster training steps there), more to compile.
    # None: on for the CPU backend.
    unroll_layers: Optional[bool] = None
    # Attention over more than one query (training, scoring, prefill): 'xla' (einsums),
    # 'cudnn' (`jax.nn.dot_product_attention`'s cuDNN flash attention; GPU, bf16/fp16),
    # 'auto' ('cudnn' where the backend, dtype and head size allow it). Decode is XLA's.
    attention_impl: str = "auto"

    def __post_init__(self):
        _check(self.model_type in _ARCHITECTURES, "model_type", self.model_type,
               f"one of {sorted(_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {_DTYPES}")
        _check(self.attention_impl in ATTENTION_IMPLS, "attention_impl", self.attention_impl,
               f"one of {ATTENTION_IMPLS}")
        _check(self.param_dtype in _DTYPES, "param_dtype", self.param_dtype, f"one of {_DTYPES}")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        if self.is_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _check(getattr(self, name) > 0, name, getattr(self, name), "> 0 for MLA models")
            _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "even")
            _check(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
                   self.q_lora_rank, "None or > 0")
        else:
            _check(self.num_attention_heads % self.num_kv_heads == 0, "num_key_value_heads",
                   self.num_key_value_heads, f"a divisor of num_attention_heads={self.num_attention_heads}")
            _check(self.gqa_head_dim % 2 == 0, "head_dim", self.gqa_head_dim, "even")
            _check(self.intermediate_size > 0, "intermediate_size", self.intermediate_size, "> 0")
        if self.n_routed_experts:
            _check(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                   self.num_experts_per_tok, f"in 1..n_routed_experts={self.n_routed_experts}")
            _check(self.moe_intermediate_size > 0, "moe_intermediate_size",
                   self.moe_intermediate_size, "> 0")
            _check(self.n_routed_experts % self.n_group == 0, "n_group", self.n_group,
                   f"a divisor of n_routed_experts={self.n_routed_experts}")
            _check(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
                   f"in 1..n_group={self.n_group}")
            _check(self.num_experts_per_tok <= self.topk_group * self.experts_per_group,
                   "num_experts_per_tok", self.num_experts_per_tok,
                   "at most topk_group * experts per group")
            _check(self.scoring_func in ("sigmoid", "softmax"), "scoring_func",
                   self.scoring_func, "'sigmoid' or 'softmax'")
            _check(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
                   "topk_method", self.topk_method, "'noaux_tc', 'greedy' or 'group_limited_greedy'")
            _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                   "first_k_dense_replace", self.first_k_dense_replace,
                   f"in 0..num_hidden_layers={self.num_hidden_layers}")
            _check(self.moe_matmul in MOE_MATMULS, "moe_matmul", self.moe_matmul,
                   f"one of {MOE_MATMULS}")
            if self.first_k_dense_replace:
                _check(self.intermediate_size > 0, "intermediate_size", self.intermediate_size,
                       "> 0 when first_k_dense_replace > 0")
        _check(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
               self.num_nextn_predict_layers, "0 or 1")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type.startswith("deepseek")

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.gqa_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace if self.n_routed_experts else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def activation_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(head dim), times YaRN's mscale(factor, mscale_all_dim)**2 for yarn RoPE."""
        head = self.qk_head_dim if self.is_mla else self.gqa_head_dim
        scale = head ** -0.5
        rs = self.rope_scaling
        if rs.rope_type == "yarn" and rs.mscale_all_dim:
            scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Hugging Face config.json -------------------------------------------------------------------

def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling]:
    """Reads both spellings: `rope_scaling` + top-level `rope_theta`, or `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**params, **scaling}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type in ("deepseek_yarn",):
        rope_type = "yarn"
    if rope_type not in ("default", "yarn", "llama3"):
        raise ValueError(f"config.json: unsupported RoPE type {rope_type!r} "
                         "(supported: default, yarn, llama3)")
    if rope_type == "default":
        return theta, RopeScaling()
    orig = merged.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        original_max_position_embeddings=int(orig),
        beta_fast=float(merged.get("beta_fast", 32.0)),
        beta_slow=float(merged.get("beta_slow", 1.0)),
        mscale=float(merged.get("mscale", 1.0)),
        mscale_all_dim=float(merged.get("mscale_all_dim", 0.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
    )


def from_hf_config(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json` dict (DeepSeek-V2/V3, Qwen2, Llama)."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        arch = hf.get("architectures")
        raise ValueError(f"config.json: unsupported architecture model_type={model_type!r} "
                         f"architectures={arch!r}; supported: {sorted(_ARCHITECTURES.values())}")
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size", 0),
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or 0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )
    if model_type.startswith("deepseek"):
        kw.update(
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)),
            n_routed_experts=hf.get("n_routed_experts") or 0,
            num_experts_per_tok=hf.get("num_experts_per_tok") or 0,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            moe_intermediate_size=hf.get("moe_intermediate_size") or 0,
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "deepseek_v3")),
            scoring_func=hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax"),
            topk_method=hf.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy"),
            aux_loss_alpha=float(hf.get("aux_loss_alpha", 0.0) or 0.0),
            num_nextn_predict_layers=hf.get("num_nextn_predict_layers", 0) or 0,
        )
    else:
        kw.update(
            head_dim=hf.get("head_dim") or 0,
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        )
    kw.update(overrides)
    return ModelConfig(**kw)


def to_hf_config(cfg: ModelConfig) -> dict:
    """A `config.json` dict that transformers and `from_hf_config` both read."""
    rs = cfg.rope_scaling
    rope = {"rope_type": rs.rope_type, "rope_theta": cfg.rope_theta}
    if rs.rope_type == "yarn":
        rope.update(factor=rs.factor, original_max_position_embeddings=rs.original_max_position_embeddings,
                    beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, mscale=rs.mscale,
                    mscale_all_dim=rs.mscale_all_dim)
    elif rs.rope_type == "llama3":
        rope.update(factor=rs.factor, original_max_position_embeddings=rs.original_max_position_embeddings,
                    low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if rs.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1
                         else (cfg.eos_token_id[0] if cfg.eos_token_id else None)),
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }
    if cfg.is_mla:
        hf.update(
            q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, head_dim=cfg.qk_rope_head_dim, qk_head_dim=cfg.qk_head_dim,
            rope_interleave=cfg.rope_interleave, attention_bias=False,
            n_routed_experts=cfg.n_routed_experts or None, num_experts_per_tok=cfg.num_experts_per_tok or None,
            n_shared_experts=cfg.n_shared_experts or None,
            moe_intermediate_size=cfg.moe_intermediate_size,
            first_k_dense_replace=cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers,
            n_group=cfg.n_group, topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.norm_topk_prob,
            scoring_func=cfg.scoring_func, topk_method=cfg.topk_method,
            aux_loss_alpha=cfg.aux_loss_alpha, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        )
    else:
        hf.update(head_dim=cfg.gqa_head_dim, attention_bias=cfg.attention_bias)
        if cfg.model_type == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
    return hf


# Presets --------------------------------------------------------------------------------------

def _build(overrides: dict, **defaults) -> ModelConfig:
    return ModelConfig(**{**defaults, **overrides})


def deepseek_v3_671b(**overrides) -> ModelConfig:
    """DeepSeek-V3 / DeepSeek-R1 (same architecture): 671B parameters, 37B active per token."""
    return _build(overrides,
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling("yarn", factor=40.0, original_max_position_embeddings=4096,
                                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, aux_loss_alpha=1e-4,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=(1,),
        dtype="bfloat16", param_dtype="bfloat16")


def deepseek_v2_lite_16b(**overrides) -> ModelConfig:
    """DeepSeek-V2-Lite: 15.7B parameters, softmax routing, no query compression."""
    return _build(overrides,
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        rms_norm_eps=1e-6, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling("yarn", factor=40.0, original_max_position_embeddings=4096,
                                 beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
        moe_intermediate_size=1408, first_k_dense_replace=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="greedy", aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=(100001,),
        dtype="bfloat16", param_dtype="bfloat16")


def qwen2_5_0_5b(**overrides) -> ModelConfig:
    """Qwen2.5-0.5B (base): tied embeddings, q/k/v biases."""
    return _build(overrides,
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True, attention_bias=True, bos_token_id=151643,
        eos_token_id=(151643,))


def qwen2_5_1_5b(**overrides) -> ModelConfig:
    """Qwen2.5-1.5B (base): tied embeddings, q/k/v biases."""
    return _build(overrides,
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
        rms_norm_eps=1e-6, max_position_embeddings=131072, rope_theta=1e6,
        tie_word_embeddings=True, attention_bias=True, bos_token_id=151643,
        eos_token_id=(151643,))


def r1_distill_qwen_1_5b(**overrides) -> ModelConfig:
    """DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-Math-1.5B shape, untied head, theta 1e4."""
    return qwen2_5_1_5b(**{"tie_word_embeddings": False, "rope_theta": 10000.0,
                           "bos_token_id": 151646, "eos_token_id": (151643,), **overrides})


def llama3_1_8b(**overrides) -> ModelConfig:
    """Llama 3.1 8B (and DeepSeek-R1-Distill-Llama-8B, the same architecture)."""
    return _build(overrides,
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=8192,
                                 low_freq_factor=1.0, high_freq_factor=4.0),
        bos_token_id=128000, eos_token_id=(128001, 128008, 128009), dtype="bfloat16",
        param_dtype="bfloat16")


r1_distill_llama_8b = llama3_1_8b


def tiny_moe(**overrides) -> ModelConfig:
    """A DeepSeek-V3-shaped model small enough for unit tests (the fixtures' shape + MTP)."""
    kw = dict(
        model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rope_theta=10000.0,
        rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=64,
                                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        aux_loss_alpha=1e-4, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=(1,))
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_dense(**overrides) -> ModelConfig:
    """A Qwen2-shaped model small enough for unit tests."""
    kw = dict(
        model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
        attention_bias=True, bos_token_id=0, eos_token_id=(1,))
    kw.update(overrides)
    return ModelConfig(**kw)


def bench_small_deepseek(**overrides) -> ModelConfig:
    """'bench-small' DeepSeek-V3 shape: about 88M parameters, 55M active per token."""
    kw = dict(
        model_type="deepseek_v3", vocab_size=32000, hidden_size=512, intermediate_size=1024,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=1024,
                                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=256,
        first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        bos_token_id=0, eos_token_id=(1,))
    kw.update(overrides)
    return ModelConfig(**kw)


def bench_small_qwen2(**overrides) -> ModelConfig:
    """'bench-small' Qwen2 counterpart of `bench_small_deepseek`."""
    kw = dict(
        model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
        attention_bias=True, bos_token_id=0, eos_token_id=(1,))
    kw.update(overrides)
    return ModelConfig(**kw)


PRESETS = {
    "deepseek_v3_671b": deepseek_v3_671b,
    "deepseek_r1_671b": deepseek_v3_671b,
    "deepseek_v2_lite_16b": deepseek_v2_lite_16b,
    "qwen2_5_0_5b": qwen2_5_0_5b,
    "qwen2_5_1_5b": qwen2_5_1_5b,
    "r1_distill_qwen_1_5b": r1_distill_qwen_1_5b,
    "llama3_1_8b": llama3_1_8b,
    "r1_distill_llama_8b": llama3_1_8b,
    "tiny_moe": tiny_moe,
    "tiny_dense": tiny_dense,
    "bench_small_deepseek": bench_small_deepseek,
    "bench_small_qwen2": bench_small_qwen2,
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, for command-line flags (`--model deepseek_v3_671b`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
