"""Forward + backward throughput of the bench-small models, and the MoE layer against a dense one.

Run (from the repository root, in a venv with r1jax):

    python examples/benchmarks/train_step.py
    python examples/benchmarks/train_step.py --models qwen2 --batch 2 --repeats 1
    python examples/benchmarks/train_step.py --quick            # tiny, for CI (seconds)

What it measures, in float32, median of `--repeats` calls after one warm-up (compile):

- Model: for 'deepseek' (`configs.bench_small_deepseek()`, DeepSeek-V3-shaped MoE, about
  88M parameters) and 'qwen2' (`configs.bench_small_qwen2()`, dense) -- any preset name works
  too -- the jitted `jax.value_and_grad` of `r1jax.training.lm_loss` (the pretraining / SFT
  loss: forward, next-token cross-entropy, backward to every parameter; no MTP loss, no
  optimizer update) on `--batch` x `--seq-len` random tokens. Achieved FLOP/s = F / time,
  reported over the machine's matmul peak P (`common.measure_limits`: a 2048^3 float32
  matmul in JAX, measured in the same run):
      A = matmul parameters used per token (`sampling.weight_sizes`: every weight matrix
          but the embedding table, routed experts counted k / E, the output head included);
      att(s) = attention FLOPs of one query over s keys in one layer (naive MLA:
          2 * n_heads * (qk_nope + qk_rope + v_head) * s; GQA: 4 * n_heads * head_dim * s);
      F = 6 * A * b * t + 3 * L * b * sum_{i=1..t} att(i)     (causal: query i sees i keys)
  Target of the open issue (reported, not asserted): >= 60% of P.
- MoE layer: one DeepSeekMoE layer of the MoE model (`r1jax.model.moe.moe`: router, top-k of
  the routed experts through the block-sparse dispatch, the shared expert; the weights of
  its first MoE layer) against a dense SwiGLU (`r1jax.model.layers.swiglu`) of hidden size
  (k + n_shared) * moe_intermediate_size, so the two have the same active FLOPs (the
  router's d * E is extra for the MoE, <1%), on the same [b, t, d] random input,
  forward + backward (gradients to the input and every weight of a fixed random projection
  of the output). Target: the MoE within 1.5x of the dense layer's time. The expert load of
  the random routing (max / mean tokens per expert) is in the JSON.

Prints one table and writes a JSON record (`--out`). Other work on the machine skews every
number; the 1-minute load average before and after each measurement is in the JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import r1jax
from r1jax import configs, training
from r1jax.model.layers import swiglu
from r1jax.model.moe import moe

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (examples/benchmarks/common.py)
from sampling import attention_flops, weight_sizes  # noqa: E402

MODELS = {"deepseek": "bench_small_deepseek", "qwen2": "bench_small_qwen2"}
QUICK_MODELS = {"deepseek": "tiny_moe", "qwen2": "tiny_dense"}
DEFAULT_OUT = os.path.join(HERE, "results", "train_step.json")
TARGET_FRACTION, TARGET_MOE_RATIO = 0.6, 1.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--models", default="deepseek,qwen2",
                   help="comma-separated: deepseek, qwen2, or preset names (default: %(default)s)")
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--moe-model", default="deepseek",
                   help="whose MoE layer is timed against a dense SwiGLU ('' to skip)")
    g.add_argument("--quick", action="store_true",
                   help="tiny models (tiny_moe / tiny_dense), batch 2 x 16 tokens, 1 repeat")
    g = p.add_argument_group("how")
    common.add_malloc_flag(g)
    g.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=DEFAULT_OUT, help="JSON path (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        for name, full, quick in (("batch", 4, 2), ("seq_len", 512, 16), ("repeats", 3, 1)):
            if getattr(args, name) == full:
                setattr(args, name, quick)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def model_config(name: str, quick: bool) -> configs.ModelConfig:
    table = QUICK_MODELS if quick else MODELS
    cfg = configs.preset(table.get(name, name))
    # no MTP: its loss is a separate term, not part of the forward + backward measured here
    return cfg.replace(dtype="float32", param_dtype="float32", num_nextn_predict_layers=0)


def timed(fn, *args, repeats: int) -> dict:
    """Compile + first call, then the median of `repeats` calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    med, times = common.median_time(lambda: fn(*args), repeats)
    return {"median_s": med, "times_s": times, "compile_and_first_s": first}


# Whole model -----------------------------------------------------------------------------------

def train_flops(cfg, sizes, batch: int, seq: int) -> dict:
    """F of the module docstring: 6 * A per token + 3x the causal attention forward."""
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    active = sizes.body + (sizes.experts * k / e if e else 0) + sizes.head
    attention = 3.0 * cfg.num_hidden_layers * batch * attention_flops(cfg, np.arange(1, seq + 1), decode=False)
    matmul = 6.0 * active * batch * seq
    return {"flops": matmul + attention, "matmul_flops": matmul, "attention_flops": attention,
            "active_params_per_token": active}


def measure_model(name: str, args, peak: float) -> tuple[dict, r1jax.Params, configs.ModelConfig]:
    cfg = model_config(name, args.quick)
    params = r1jax.init_params(jax.random.key(args.seed), cfg, with_mtp=False)
    sizes = weight_sizes(cfg, params)
    rng = np.random.default_rng(args.seed + 1)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, args.seq_len), dtype=np.int32))
    mask = jnp.ones(tokens.shape, jnp.float32)

    @jax.jit
    def grad(params, tokens, mask):
        return jax.value_and_grad(training.lm_loss, has_aux=True)(params, tokens, mask, cfg, 0.0)

    load0 = common.load_average()
    t = timed(grad, params, tokens, mask, repeats=args.repeats)
    cost = train_flops(cfg, sizes, args.batch, args.seq_len)
    achieved = cost["flops"] / t["median_s"]
    row = {"preset": (QUICK_MODELS if args.quick else MODELS).get(name, name),
           "params": r1jax.param_count(cfg), "batch": args.batch, "seq_len": args.seq_len,
           "tokens_per_s": args.batch * args.seq_len / t["median_s"], **cost, **t,
           "achieved_flops_per_s": achieved, "fraction_of_peak": achieved / peak,
           "meets_target": achieved / peak >= TARGET_FRACTION,
           "load_before": load0, "load_after": common.load_average()}
    print(f"{name}: {row['params'] / 1e6:.1f}M parameters, {cost['active_params_per_token'] / 1e6:.1f}M "
          f"active per token; forward + backward {t['median_s']:.3f} s ({row['tokens_per_s']:.0f} tok/s, "
          f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.2f} of peak; compile+first "
          f"{t['compile_and_first_s']:.1f} s)", flush=True)
    return row, params, cfg


# MoE layer against dense ---------------------------------------------------------------------

def measure_moe_layer(cfg, params, args, peak: float) -> dict:
    """One MoE layer vs a dense SwiGLU with the same active FLOPs, forward + backward."""
    w = jax.tree.map(lambda x: x[0], params.moe_layers.mlp)  # the first MoE layer's weights
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    k, e, shared = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.n_shared_experts
    hidden = (k + shared) * f
    keys = jax.random.split(jax.random.key(args.seed + 3), 5)
    x = jax.random.normal(keys[0], (args.batch, args.seq_len, d), jnp.float32)
    cotangent = jax.random.normal(keys[1], x.shape, jnp.float32)
    dense = {"gate": jax.random.normal(keys[2], (d, hidden), jnp.float32) * d ** -0.5,
             "up": jax.random.normal(keys[3], (d, hidden), jnp.float32) * d ** -0.5,
             "down": jax.random.normal(keys[4], (hidden, d), jnp.float32) * hidden ** -0.5}

    def moe_out(w, x):
        return jnp.sum(moe(w, x, cfg)[0] * cotangent)

    def dense_out(w, x):
        return jnp.sum(swiglu(x, w["gate"], w["up"], w["down"]) * cotangent)

    moe_grad = jax.jit(jax.value_and_grad(moe_out, argnums=(0, 1)))
    dense_grad = jax.jit(jax.value_and_grad(dense_out, argnums=(0, 1)))
    n = args.batch * args.seq_len
    dense_flops = 3 * n * 2 * 3 * d * hidden
    moe_flops = dense_flops + 3 * n * 2 * d * e  # + the router
    load0 = common.load_average()
    t_moe = timed(moe_grad, w, x, repeats=args.repeats)
    t_dense = timed(dense_grad, dense, x, repeats=args.repeats)
    stats = jax.jit(lambda w, x: moe(w, x, cfg)[1])(w, x)
    load = np.asarray(stats.load, np.float64)
    ratio = t_moe["median_s"] / t_dense["median_s"]
    result = {"model": args.moe_model, "tokens": n, "hidden_size": d, "dense_hidden": hidden,
              "experts": e, "top_k": k, "shared_experts": shared, "moe_matmul": cfg.moe_matmul,
              "moe_flops": moe_flops, "dense_flops": dense_flops,
              "moe": t_moe, "dense": t_dense, "ratio": ratio, "meets_target": ratio <= TARGET_MOE_RATIO,
              "moe_fraction_of_peak": moe_flops / t_moe["median_s"] / peak,
              "dense_fraction_of_peak": dense_flops / t_dense["median_s"] / peak,
              "expert_load_max_over_mean": float(load.max() / max(load.mean(), 1e-9)),
              "load_before": load0, "load_after": common.load_average()}
    print(f"MoE layer ({e} experts, top-{k} + {shared} shared, f = {f}) {t_moe['median_s'] * 1e3:.1f} ms "
          f"vs dense SwiGLU (f = {hidden}) {t_dense['median_s'] * 1e3:.1f} ms: {ratio:.2f}x "
          f"(expert load max/mean {result['expert_load_max_over_mean']:.2f})", flush=True)
    return result


# Main ------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    args.retained_freed_memory = common.apply_malloc_policy(args)  # before any JAX work
    print(f"measuring this machine's limits ({'quick' if args.quick else 'full'})...", flush=True)
    load_before = common.load_average()
    limits = common.measure_limits(args.quick)
    peak = limits.matmul_flops
    print(f"  matmul {peak / 1e9:.1f} GFLOP/s, load average {load_before:.2f}", flush=True)
    record = {"benchmark": "train_step", "machine": common.machine(), "limits": limits.as_dict(),
              "args": vars(args), "targets": {"fraction_of_peak": TARGET_FRACTION,
                                              "moe_over_dense": TARGET_MOE_RATIO},
              "models": {}, "moe_layer": None}
    for name in args.models:
        row, params, cfg = measure_model(name, args, peak)
        record["models"][name] = row
        if name == args.moe_model and cfg.n_routed_experts:
            record["moe_layer"] = measure_moe_layer(cfg, params, args, peak)
        del params
    if args.moe_model and record["moe_layer"] is None and args.moe_model not in args.models:
        cfg = model_config(args.moe_model, args.quick)
        params = r1jax.init_params(jax.random.key(args.seed), cfg, with_mtp=False)
        record["moe_layer"] = measure_moe_layer(cfg, params, args, peak)

    header = ["model", "batch x seq", "fwd+bwd s", "tok/s", "GFLOP/s", "frac of peak", "target"]
    table = [[name, f"{r['batch']}x{r['seq_len']}", r["median_s"], r["tokens_per_s"],
              r["achieved_flops_per_s"] / 1e9, r["fraction_of_peak"], f">= {TARGET_FRACTION:.2f}"]
             for name, r in record["models"].items()]
    m = record["moe_layer"]
    if m is not None:
        table.append(["MoE layer", f"{args.batch}x{args.seq_len}", m["moe"]["median_s"],
                      m["tokens"] / m["moe"]["median_s"], m["moe_flops"] / m["moe"]["median_s"] / 1e9,
                      m["moe_fraction_of_peak"], f"<= {TARGET_MOE_RATIO}x dense: {m['ratio']:.2f}x"])
        table.append(["dense SwiGLU", f"{args.batch}x{args.seq_len}", m["dense"]["median_s"],
                      m["tokens"] / m["dense"]["median_s"], m["dense_flops"] / m["dense"]["median_s"] / 1e9,
                      m["dense_fraction_of_peak"], None])
    print()
    print(common.format_table(header, table))
    print(f"float32, median of {args.repeats}; matmul peak {peak / 1e9:.1f} GFLOP/s; load average "
          f"{load_before:.2f} -> {common.load_average():.2f}")
    path = common.write_json(args.out, record)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
