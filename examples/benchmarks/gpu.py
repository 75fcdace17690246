"""The GPU paths on one NVIDIA GPU: kernel checks, MoE and attention choices, bf16 MFU, decode.

Run (from the repository root, on a machine with an NVIDIA GPU and jax[cuda]):

    python examples/benchmarks/gpu.py                       # everything, about 5 minutes on an H200
    python examples/benchmarks/gpu.py --sections checks,moe  # some sections

Sections, in order (each records its figures or its error, and the JSON is rewritten after
each, so a run stopped early keeps what it measured):

- limits: bf16 FLOP/s of an 8192^3 matmul and bytes/s of a `jnp.sum` over 2 GiB, measured
  now; MFU is reported against both this peak and the datasheet's dense bf16 rate
  (`--peak-tflops`, 989 for an H100/H200 SXM).
- checks: the Pallas grouped-matmul kernels (`r1jax.model.grouped_matmul`, through Triton)
  against their XLA reference, forward and both backward products, bf16 and float32; the
  MoE 'grouped' dispatch against the 'blocks' loop (outputs and gradients); cuDNN flash
  attention (`attention_impl='cudnn'`) against the einsum path on the bench-small models
  and on a layer with DeepSeek-V3's head sizes (192 / 128): logits and gradients.
- moe: forward + backward of the routed experts of one layer (bench-small: d 512, 16
  experts, top-4, f 256; a V2-Lite-sized layer: d 2048, 64 experts, top-6, f 1408) by each
  dispatch ('blocks' loop, 'grouped' XLA, 'grouped' Pallas, `ragged_dot`) against a dense
  SwiGLU with the same routed FLOPs; and the whole MoE layer ('auto', shared experts and
  router included) against a dense SwiGLU of the same active FLOPs (the issue's <= 1.5x).
- train: bf16 forward + backward (`training.lm_loss`, the jitted value_and_grad) of the
  bench-small models (16 x 1024 tokens) with the 'auto' choices and with the XLA ones
  ('xla' attention, 'blocks' MoE), and of Qwen2.5-1.5B (8 x 2048): MFU = F / time / peak,
  F as in train_step.py (6 x active parameters per token + causal attention).
- decode: bf16 `r1jax.sampling.sample` new tokens/s (64-token prompts, 128 new tokens,
  temperature 1, no stop) for the bench-small models and Qwen2.5-1.5B at `--batch`, with
  the fraction of the memory-bound floor (decode bytes of sampling.generate_cost at 2
  bytes per value over the measured bandwidth).
- grpo: grpo_step.py's GRPO step (8 prompts x G = 8, 64 + 128 tokens, beta 0.04, one AdamW
  step) of the bench-small models in bf16: seconds per step and per phase, with each
  group's prompt run once (`RolloutBatch.group_size`) and with whole rows; and the
  reference log-probs of one batch both ways in float32 at 'highest' matmul precision
  (the prompt pass through cuDNN where it applies, the completions through the KV cache):
  they must agree to float32 rounding (and the two bf16 runs' first gradient norms, from
  the same samples, to bf16 rounding).

Random weights throughout (speed and agreement do not depend on training). Writes `--out`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import r1jax
from r1jax import configs, training
from r1jax.rl import grpo as grpo_lib
from r1jax.rl import rollout
from r1jax.losses import next_token_loss
from r1jax.model import grouped_matmul as gmm
from r1jax.model import moe as moe_lib
from r1jax.model.layers import swiglu
from r1jax.sampling import SamplingConfig, sample

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from grpo_step import (generate_id_groups, prompt_examples, random_prompts, run_r1jax,  # noqa: E402
                       step_flops)
from sampling import generate_cost, weight_sizes  # noqa: E402
from train_step import timed, train_flops  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "gpu.json")
BF16 = dict(dtype="bfloat16", param_dtype="bfloat16", num_nextn_predict_layers=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTION_FUNCTIONS))
    p.add_argument("--large", default="qwen2_5_1_5b", help="the 1B-class preset ('' to skip)")
    p.add_argument("--models", default="qwen2,deepseek",
                   help="bench-small models of train and decode (default: %(default)s)")
    p.add_argument("--no-baselines", action="store_true",
                   help="train: skip the runs with the XLA choices ('xla' attention, 'blocks' MoE)")
    p.add_argument("--batch", type=int, default=64, help="decode batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip what starts after this many seconds (device time is scarce)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 rate")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true",
                   help="no GPU: tiny sizes, kernels interpreted, XLA standing in for cuDNN "
                        "(checks that the script runs, measures nothing)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTION_FUNCTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {list(SECTION_FUNCTIONS)}")
    args.models = [m for m in args.models.split(",") if m]
    if args.smoke:
        args.large, args.batch, args.repeats = "", 2, 1
        real = jax.nn.dot_product_attention
        jax.nn.dot_product_attention = lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"})
    return args


def pallas(args) -> str:
    return "pallas_interpret" if args.smoke else "pallas"


def size(args, full: int, smoke: int) -> int:
    return smoke if args.smoke else full


def bench_small(args, model: str) -> str:
    return {"qwen2": "tiny_dense", "deepseek": "tiny_moe"}[model] if args.smoke else f"bench_small_{model}"


START = time.perf_counter()


def over_budget(args) -> bool:
    return time.perf_counter() - START > args.budget_s


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def tree_rel_err(got, want) -> float:
    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


# Sections --------------------------------------------------------------------------------------

def limits(args, record):
    size = 512 if args.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    peak = 2.0 * size ** 3 / common.best_time(lambda: matmul(a, b), 10)
    x = jnp.ones((2 ** (20 if args.smoke else 29),), jnp.float32)
    total = jax.jit(jnp.sum)
    bandwidth = x.nbytes / common.best_time(lambda: total(x), 10)
    device = jax.devices()[0]
    return {"device": device.device_kind, "compute_capability": getattr(device, "compute_capability", None),
            "bf16_matmul_flops": peak, "bandwidth_bytes": bandwidth,
            "datasheet_bf16_flops": args.peak_tflops * 1e12}


def checks(args, record):
    out = {}
    rng = np.random.default_rng(0)
    e, k, n, rows = 8, 512, 384, 64
    block_expert = jnp.asarray([0, 0, 1, 3, 3, 3, 6, 7, -1, -1], jnp.int32)
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.asarray(rng.standard_normal((rows * 10, k)), dtype)
        w = jnp.asarray(rng.standard_normal((e, k, n)) / np.sqrt(k), dtype)
        cot = jnp.asarray(rng.standard_normal((rows * 10, n)), dtype)

        def vjp(x, w, cot, impl):
            y, back = jax.vjp(lambda x, w: gmm.grouped_matmul(x, w, block_expert, impl), x, w)
            return (y, *back(cot))

        got, want = (jax.jit(vjp, static_argnums=3)(x, w, cot, impl) for impl in (pallas(args), "xla"))
        out[f"grouped_matmul_{jnp.dtype(dtype).name}"] = {
            name: rel_err(g, w_) for name, g, w_ in zip(("y", "dx", "dw"), got, want)}

    cfg = configs.bench_small_deepseek(**BF16)
    c = moe_case(cfg, size(args, 4096, 256), seed=1)
    cot = jax.random.normal(jax.random.key(5), c["x"].shape, jnp.bfloat16)

    def moe_vjp(c, cot, fn):
        y, back = jax.vjp(lambda x, w, g, u, d: fn(x, c["experts"], w, g, u, d)[0],
                          c["x"], c["weights"], c["gate"], c["up"], c["down"])
        return (y, *back(cot))

    grouped = functools.partial(moe_lib.expert_ffn_grouped, block=64, impl=pallas(args))
    blocks = functools.partial(moe_lib.expert_ffn_blocks, block=64)
    got, want = (jax.jit(moe_vjp, static_argnums=2)(c, cot, fn) for fn in (grouped, blocks))
    out["moe_grouped_pallas_vs_blocks_bf16"] = {
        name: rel_err(g, w_) for name, g, w_ in zip(("y", "dx", "dweights", "dgate", "dup", "ddown"), got, want)}

    v3_heads = configs.tiny_moe(hidden_size=512, num_attention_heads=4, num_key_value_heads=4,
                                q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=128,
                                qk_rope_head_dim=64, v_head_dim=128, num_hidden_layers=2, **BF16)
    for name, cfg in (("bench_small_qwen2", configs.bench_small_qwen2(**BF16)),
                      ("bench_small_deepseek", configs.bench_small_deepseek(**BF16)),
                      ("mla_v3_head_sizes", v3_heads)):
        params = r1jax.init_params(jax.random.key(0), cfg, with_mtp=False)
        tokens = jax.random.randint(jax.random.key(1), (size(args, 4, 1), size(args, 512, 16)), 2,
                                    cfg.vocab_size)
        mask = jnp.ones(tokens.shape, jnp.float32)

        # MoE routing replayed from the XLA run: in bf16 a rounding difference flips near-tied
        # top-k choices, which moves those tokens' logits far more than attention's rounding
        # (free routing: max relative logit difference ~0.8 on CPU with XLA on both sides)
        routing = ({"moe": jax.jit(lambda p: r1jax.forward(p, tokens, cfg).aux["experts"])(params)}
                   if cfg.n_routed_experts else None)

        def grads(c):
            loss = lambda p, r: next_token_loss(r1jax.forward(p, tokens, c, routing=r).logits, tokens, mask)
            return jax.jit(jax.value_and_grad(loss))(params, routing)

        def logits(c):
            fn = lambda p, r: r1jax.forward(p, tokens, c, routing=r).logits
            return jax.jit(fn).lower(params, routing).compile()

        (loss_x, g_x), (loss_c, g_c) = grads(cfg.replace(attention_impl="xla")), grads(cfg.replace(attention_impl="cudnn"))
        compiled = logits(cfg.replace(attention_impl="cudnn"))
        lx, lc = logits(cfg.replace(attention_impl="xla"))(params, routing), compiled(params, routing)
        out[f"cudnn_attention_{name}"] = {
            "logits_rel": rel_err(lc, lx), "loss_xla": float(loss_x), "loss_cudnn": float(loss_c),
            "grads_rel_max": tree_rel_err(g_c, g_x), "hlo_has_cudnn": "cudnn" in compiled.as_text()}
    return out


def fan_in_normal(key, shape) -> jax.Array:
    """bf16 weights of unit-variance outputs: normal / sqrt(fan-in = shape[-2])."""
    return (jax.random.normal(key, shape) * shape[-2] ** -0.5).astype(jnp.bfloat16)


def swiglu_weights(key, d: int, hidden: int) -> list:
    """gate [d, hidden], up [d, hidden], down [hidden, d] of a dense SwiGLU."""
    keys = jax.random.split(key, 3)
    return [fan_in_normal(keys[0], (d, hidden)), fan_in_normal(keys[1], (d, hidden)),
            fan_in_normal(keys[2], (hidden, d))]


def moe_case(cfg, tokens: int, seed: int):
    """Random routed inputs of one MoE layer of `cfg`: x, experts (top-k of random scores),
    weights, expert weights."""
    d, e, k, f = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    keys = jax.random.split(jax.random.key(seed), 6)
    dt = jnp.bfloat16
    scores = jax.random.uniform(keys[0], (tokens, e))
    weights, experts = jax.lax.top_k(scores, k)
    return {"x": jax.random.normal(keys[1], (tokens, d), dt), "experts": experts.astype(jnp.int32),
            "weights": weights.astype(dt),
            "gate": fan_in_normal(keys[2], (e, d, f)), "up": fan_in_normal(keys[3], (e, d, f)),
            "down": fan_in_normal(keys[4], (e, f, d))}


def moe(args, record):
    out = {}
    v2_lite_layer = configs.bench_small_deepseek(
        hidden_size=2048, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
        n_shared_experts=2, n_group=1, topk_group=1, **BF16)
    cases = [("bench_small", configs.bench_small_deepseek(**BF16), 16384),
             ("v2_lite_layer", v2_lite_layer, 8192)]
    if args.smoke:
        cases = [("tiny", configs.tiny_moe(**BF16), 2048)]
    for name, cfg, tokens in cases:
        c = moe_case(cfg, tokens, seed=2)
        d, k, f = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        cot = jax.random.normal(jax.random.key(3), c["x"].shape, jnp.bfloat16)
        routed = {
            "blocks": lambda *a: moe_lib.expert_ffn_blocks(*a, moe_lib.block_size(tokens * k, cfg.n_routed_experts)),
            "grouped_xla": lambda *a: moe_lib.expert_ffn_grouped(*a, 64, "xla"),
            "grouped_pallas": lambda *a: moe_lib.expert_ffn_grouped(*a, 64, pallas(args)),
            "ragged_dot": moe_lib.expert_ffn_ragged,
        }
        dense_w = swiglu_weights(jax.random.key(4), d, k * f)
        flops = 3 * 2 * 3 * tokens * d * k * f
        row = {"tokens": tokens, "d": d, "experts": cfg.n_routed_experts, "top_k": k, "f": f,
               "routed_flops_fwd_bwd": flops}
        dense = jax.jit(jax.grad(lambda x, g, u, dn, cot: jnp.sum(swiglu(x, g, u, dn) * cot).astype(
            jnp.float32), argnums=(0, 1, 2, 3)))
        row["dense_same_routed_flops"] = timed(dense, c["x"], *dense_w, cot, repeats=args.repeats)
        for label, fn in routed.items():
            grad = jax.jit(jax.grad(lambda x, w, g, u, dn, experts, cot, fn=fn: jnp.sum(
                fn(x, experts, w, g, u, dn)[0] * cot).astype(jnp.float32), argnums=(0, 1, 2, 3, 4)))
            try:
                row[label] = timed(grad, c["x"], c["weights"], c["gate"], c["up"], c["down"],
                                   c["experts"], cot, repeats=args.repeats)
                row[label]["over_dense"] = row[label]["median_s"] / row["dense_same_routed_flops"]["median_s"]
            except Exception as exc:  # one failing variant must not hide the others
                row[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            print(f"  moe {name} {label}: {row[label]}", flush=True)
        out[name] = row

        # the whole layer ('auto': grouped Pallas here) vs a dense SwiGLU of equal active FLOPs
        params = r1jax.init_params(jax.random.key(0), cfg.replace(num_hidden_layers=2, first_k_dense_replace=1),
                                   with_mtp=False)
        w = jax.tree.map(lambda a: a[0], params.moe_layers.mlp)
        x = c["x"].reshape(tokens // 1024, 1024, d)
        hidden = (k + cfg.n_shared_experts) * f
        dw = swiglu_weights(jax.random.key(5), d, hidden)
        cot = cot.reshape(x.shape)
        layer = jax.jit(jax.grad(lambda w, x, cot: jnp.sum(moe_lib.moe(w, x, cfg)[0] * cot).astype(
            jnp.float32), argnums=(0, 1)))
        dense_layer = jax.jit(jax.grad(lambda w, x, cot: jnp.sum(swiglu(x, *w) * cot).astype(
            jnp.float32), argnums=(0, 1)))
        t_moe = timed(layer, w, x, cot, repeats=args.repeats)
        t_dense = timed(dense_layer, dw, x, cot, repeats=args.repeats)
        out[f"{name}_whole_layer"] = {"resolved": moe_lib.resolve_moe_matmul(cfg), "moe": t_moe,
                                      "dense": t_dense, "ratio": t_moe["median_s"] / t_dense["median_s"]}
        print(f"  moe {name} whole layer: {out[f'{name}_whole_layer']['ratio']:.2f}x dense", flush=True)
    return out


def train(args, record):
    out = {}
    peak = record["limits"]["bf16_matmul_flops"]
    b, t = size(args, 16, 2), size(args, 1024, 32)
    baselines = {"qwen2": {"attention_impl": "xla"},
                 "deepseek": {"attention_impl": "xla", "moe_matmul": "blocks"}}
    runs = []
    for model in args.models:
        runs.append((bench_small(args, model), {}, b, t))
        if not args.no_baselines:
            runs.append((bench_small(args, model), baselines[model], b, t))
    if args.large:
        runs.append((args.large, {}, 8, 2048))
    for preset, overrides, batch, seq in runs:
        label = preset + "".join(f"_{v}" for v in overrides.values())
        if over_budget(args):
            out[label] = {"skipped": "over --budget-s"}
            continue
        try:
            cfg = configs.preset(preset).replace(**BF16, **overrides)
            params = r1jax.init_params(jax.random.key(0), cfg, with_mtp=False)
            tokens = jax.random.randint(jax.random.key(1), (batch, seq), 2, cfg.vocab_size)
            mask = jnp.ones(tokens.shape, jnp.float32)
            grad = jax.jit(jax.value_and_grad(lambda p, t, m: training.lm_loss(p, t, m, cfg, 0.0)[0]))
            t = timed(grad, params, tokens, mask, repeats=args.repeats)
            cost = train_flops(cfg, weight_sizes(cfg, params), batch, seq)
            achieved = cost["flops"] / t["median_s"]
            out[label] = {"batch": batch, "seq_len": seq, "params": r1jax.param_count(cfg), **cost, **t,
                          "tokens_per_s": batch * seq / t["median_s"], "achieved_flops_per_s": achieved,
                          "mfu_datasheet": achieved / (args.peak_tflops * 1e12),
                          "fraction_of_measured_peak": achieved / peak,
                          "moe_matmul": moe_lib.resolve_moe_matmul(cfg) if cfg.n_routed_experts else None}
            del params
        except Exception as exc:
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"  train {label}: {out[label]}", flush=True)
    return out


def decode(args, record):
    out = {}
    bandwidth = record["limits"]["bandwidth_bytes"]
    scfg = SamplingConfig(max_new_tokens=128, temperature=1.0)
    presets = [bench_small(args, model) for model in args.models] + ([args.large] if args.large else [])
    for preset in presets:
        if over_budget(args):
            out[preset] = {"skipped": "over --budget-s"}
            continue
        try:
            cfg = configs.preset(preset).replace(**BF16)
            params = r1jax.init_params(jax.random.key(0), cfg, with_mtp=False)
            rng = np.random.default_rng(0)
            tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, 64), dtype=np.int32))
            lengths = jnp.full((args.batch,), 64, jnp.int32)
            t = timed(lambda p: sample(p, cfg, tokens, lengths, jax.random.key(1), scfg), params,
                      repeats=max(1, args.repeats - 1))
            cost = generate_cost(cfg, weight_sizes(cfg, params), args.batch, 64, 128)
            floor = cost["decode_bytes"] / 2 / bandwidth + cost["prefill_flops"] / record["limits"]["bf16_matmul_flops"]
            out[preset] = {"batch": args.batch, **t, "new_tokens_per_s": args.batch * 128 / t["median_s"],
                           "memory_floor_s": floor, "fraction_of_floor": floor / t["median_s"]}
            del params
        except Exception as exc:
            out[preset] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"  decode {preset}: {out[preset]}", flush=True)
    return out


def grpo(args, record):
    out = {}
    peak = record["limits"]["bf16_matmul_flops"]
    step = argparse.Namespace(prompts=size(args, 8, 2), num_generations=size(args, 8, 4),
                              prompt_len=size(args, 64, 8), new_tokens=size(args, 128, 8),
                              beta=0.04, learning_rate=1e-6, repeats=args.repeats, seed=0)
    rows = step.prompts * step.num_generations
    for model in args.models:
        preset = bench_small(args, model)
        if over_budget(args):
            out[preset] = {"skipped": "over --budget-s"}
            continue
        row = out[preset] = {}
        try:
            cfg = configs.preset(preset).replace(**BF16)
            init = lambda c: r1jax.init_params(jax.random.key(step.seed), c, with_mtp=False)  # noqa: E731
            prompts = random_prompts(cfg, step.prompts, step.prompt_len, step.seed + 2)
            row["logprobs_shared_vs_rows_float32"] = shared_prompt_parity(
                cfg.replace(dtype="float32", param_dtype="float32"), init, prompts, step)
            print(f"  grpo {preset} parity: {row['logprobs_shared_vs_rows_float32']}", flush=True)
            flops = step_flops(cfg, weight_sizes(cfg, init(cfg)), rows, step.prompt_len,
                               step.new_tokens, step.num_generations)
            for label, share in (("shared_prompts", True), ("whole_rows", False)):
                step.no_share_prompts = not share
                res = run_r1jax(cfg, init(cfg), prompts, step)  # init: the step donates the params
                total = flops["total_shared" if share else "total"]
                row[label] = {"median": res["median"], "warmup": res["warmup"],
                              "fraction_of_measured_peak": total / peak / res["median"]["step_s"]}
            row["flops"] = flops
            # the same samples (same weights and key) through both paths: the first step's
            # gradient norm differs by bf16 rounding only
            norms = [row[k]["warmup"]["grad_norm"] for k in ("shared_prompts", "whole_rows")]
            row["warmup_grad_norm_rel_diff"] = abs(norms[0] - norms[1]) / max(abs(norms[1]), 1e-30)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"  grpo {preset}: {row}", flush=True)
    return out


def shared_prompt_parity(cfg, init, prompts, step) -> dict:
    """Reference log-probs of one sampled GRPO batch with each group's prompt run once and
    with whole rows, in float32 at 'highest' matmul precision: max |difference| over the
    completion tokens, and the largest |log-prob| for scale."""
    params = init(cfg)
    gcfg = dataclasses.replace(grpo_lib.grpo_deepseekmath(), num_generations=step.num_generations,
                               beta=step.beta, max_completion_length=step.new_tokens)
    with jax.default_matmul_precision("highest"):
        scfg = SamplingConfig(max_new_tokens=step.new_tokens, temperature=1.0, return_logprobs=False)
        groups = generate_id_groups(params, cfg, prompt_examples(prompts), jax.random.key(1),
                                    step.num_generations, scfg, step.prompt_len)
        shared, whole = (rollout.assemble_batch(groups, cfg, gcfg, params=params, ref_params=params,
                                                share_prompts=share) for share in (True, False))
    if shared.group_size != step.num_generations or whole.group_size is not None:
        raise RuntimeError(f"group_size {shared.group_size} / {whole.group_size}: sharing not as asked")
    mask = np.asarray(shared.mask) > 0
    got, want = np.asarray(shared.ref_logp)[mask], np.asarray(whole.ref_logp)[mask]
    return {"max_abs_diff": float(np.abs(got - want).max()), "max_abs_logprob": float(np.abs(want).max()),
            "tokens": int(mask.sum())}


SECTION_FUNCTIONS = {"limits": limits, "checks": checks, "moe": moe, "train": train, "decode": decode,
                     "grpo": grpo}


def main(argv=None):
    args = parse_args(argv)
    record = {"benchmark": "gpu", "machine": common.machine(), "args": vars(args)}
    for name in args.sections:  # in the order given
        if over_budget(args):
            record[name] = {"skipped": "over --budget-s"}
            continue
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            record[name] = SECTION_FUNCTIONS[name](args, record)
        except Exception:
            record[name] = {"error": traceback.format_exc()[-3000:]}
            print(record[name]["error"], flush=True)
        record[f"{name}_wall_s"] = time.perf_counter() - start
        print(f"   {name}: {record[f'{name}_wall_s']:.1f} s", flush=True)
        common.write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
