"""Sampling speed of r1jax against Hugging Face transformers, on the same weights, in one run.

Run (from the repository root, in a venv that has r1jax, torch and transformers):

    python examples/benchmarks/sampling.py
    python examples/benchmarks/sampling.py --models deepseek --batch-sizes 8 --repeats 1
    python examples/benchmarks/sampling.py --quick --skip-peer        # tiny, for CI (seconds)

What it measures, for each model ('deepseek' = `configs.bench_small_deepseek()`, about 88M
parameters, DeepSeek-V3-shaped; 'qwen2' = `configs.bench_small_qwen2()`, its dense
counterpart; any other preset name works too) in float32 and each batch size: right-padded
random prompts of `--prompt-len` tokens, `--new-tokens` new tokens at temperature 1 with no
stop tokens, so every row generates every token.

- r1jax: `r1jax.sampling.sample`, one warm-up call (compiles), then the median of
  `--repeats` timed calls (`block_until_ready`). New tokens per second = batch * new tokens
  / wall time of the whole call (prefill included).
- Hugging Face: r1jax's parameters are written with `r1jax.save_hf` to a temporary folder
  and read back with `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32)`;
  first its logits on a short input are compared with `r1jax.forward` (max abs diff,
  must be < 1e-3: the same weights, and proof that `save_hf` writes what transformers
  reads), then `generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
  max_new_tokens=N, min_new_tokens=N)` with eos disabled, torch threads = 2, one short
  warm-up and the median of `--repeats`. Skipped with `--skip-peer` or when torch or
  transformers cannot be imported.
- The machine's limit, measured in the same run (`common.measure_limits`): P = FLOP/s of a
  2048^3 float32 matmul in JAX, B = bytes/s of a `jnp.sum` over 512 MiB. With F and M
  below, time floor = max(F / P, M / B) and limit fraction = time floor / measured time.

  F (model FLOPs of the whole generate call; b rows, P prompt tokens, N new tokens, L layers):
      A      = matmul parameters used per token: every weight matrix except the embedding
               table (tied: it is the head) and the output head, with routed experts counted
               k / E (top-k of E), shared experts and dense layers in full;
      H      = d * vocab (output head);
      att(s) = attention FLOPs of one query over s keys in one layer:
               GQA 4 * n_heads * head_dim * s;
               MLA prefill (naive) 2 * n_heads * (qk_nope + qk_rope + v_head) * s;
               MLA decode (weight-absorbed) 2 * n_heads * (2 * kv_lora + qk_rope) * s;
      F = b * [P * 2A + 2H + L * sum_{i=1..P} att_prefill(i)]             (prefill; head at
                                                                             the last token)
        + b * sum_{j=1..N-1} [2A + 2H + L * att_decode(P + j)]            (decode steps)
  M (bytes moved):
      prefill: every weight once (all experts) + writing P cache entries per row;
      decode step j: the weights it needs, read once (routed experts: the expected number
      of distinct experts b rows pick uniformly, E * (1 - (1 - k/E)^b)) + the valid cache
      read, b * L * (P + j) * cache values per token per layer * 4 bytes.
  (JSON also holds `floor_phased_s` = max(F/P, M/B) of prefill + the same of decode, a
  tighter floor: prefill is compute-bound and decode memory-bound; and `floor_dot_stream_s`,
  the phased floor with decode bytes at the rate a chain of [8, 512] x [512, 1536] matmuls
  over cold weights streams them (`common.dot_stream_bandwidth`, about half of B on this
  2-core machine for XLA and PyTorch alike): the table's "limit frac (dot bw)".)

- Cache bytes per token: r1jax's cache (`r1jax.model.cache.values_per_token_per_layer`:
  MLA latent + RoPE key, kv_lora_rank + qk_rope_head_dim) against full per-head keys and
  values (`full_kv_values_per_token_per_layer`), per layer and over all layers.
- MTP self-speculative decoding (DeepSeek models, `num_nextn_predict_layers=1`, batch
  `--spec-batch-size`, greedy): speed-up of `SamplingConfig(speculative=True)` over plain
  decoding of the same model, the draft acceptance rate, and whether the greedy tokens
  agree. Random weights make the MTP module's drafts near-random, so expect a low
  acceptance rate and a speed-up below 1; the number says what one verify step costs.
  Then the same on a model whose MTP module was trained: the toy DeepSeek-V3-shaped base
  of the main example (`examples/pretrain_tiny.py`, pretrained into `--toy-workdir` on
  first use, about 5 minutes), on arithmetic prompts with its stop token, greedy and at
  temperature 1, batch `--spec-batch-size` and 4x that (`--quick`: the first only).
  Tokens/s there count the tokens actually generated (rows stop at their end-of-sequence
  token).

Prints one table and writes a JSON record (`--out`). Other work on the machine skews
every number; the 1-minute load average before and after each measurement is in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import r1jax
from r1jax import configs
from r1jax.model import cache as cache_lib
from r1jax.sampling import SamplingConfig, sample

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (examples/benchmarks/common.py)

MODELS = {"deepseek": "bench_small_deepseek", "qwen2": "bench_small_qwen2"}
QUICK_MODELS = {"deepseek": "tiny_moe", "qwen2": "tiny_dense"}
DEFAULT_OUT = os.path.join(HERE, "results", "sampling.json")
MATCH_TOLERANCE = 1e-3
BYTES = 4  # float32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--models", default="deepseek,qwen2",
                   help="comma-separated: deepseek, qwen2, or preset names (default: %(default)s)")
    g.add_argument("--batch-sizes", default="8,32", help="comma-separated (default: %(default)s)")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--quick", action="store_true",
                   help="tiny models and sizes (tiny_moe / tiny_dense, batch 2, 8 + 8 tokens, 1 repeat)")
    g = p.add_argument_group("how")
    common.add_malloc_flag(g)
    g.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    g.add_argument("--skip-peer", action="store_true", help="do not run Hugging Face transformers")
    g.add_argument("--skip-spec", action="store_true", help="do not measure MTP speculative decoding")
    g.add_argument("--spec-batch-size", type=int, default=8)
    g.add_argument("--toy-workdir", default=None,
                   help="where the toy base model is pretrained and kept (default: runs/bench_toy_base; "
                        "--quick: a temporary folder)")
    g.add_argument("--toy-steps", type=int, default=400, help="pretraining steps of the toy base")
    g.add_argument("--torch-threads", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=DEFAULT_OUT, help="JSON path (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        if args.batch_sizes == "8,32":
            args.batch_sizes = "2"
        if args.prompt_len == 64:
            args.prompt_len = 8
        if args.new_tokens == 128:
            args.new_tokens = 8
        if args.repeats == 3:
            args.repeats = 1
        args.spec_batch_size = min(args.spec_batch_size, 2)
        args.toy_steps = min(args.toy_steps, 2)
    if args.toy_workdir is None:
        args.toy_workdir = (tempfile.mkdtemp(prefix="r1jax_bench_toy_") if args.quick
                            else os.path.join("runs", "bench_toy_base"))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    return args


def model_config(name: str, quick: bool) -> configs.ModelConfig:
    table = QUICK_MODELS if quick else MODELS
    cfg = configs.preset(table.get(name, name))
    return cfg.replace(dtype="float32", param_dtype="float32")


# Analytic cost ---------------------------------------------------------------------------------

@dataclasses.dataclass
class WeightSizes:
    """Parameter counts of the main model (MTP excluded) by how a token uses them."""

    body: int  # matrices every token uses: attention, dense MLPs, shared experts, routers
    experts: int  # routed expert matrices, all experts of all MoE layers
    head: int  # d * vocab (the embedding table when tied)
    vectors: int  # norms and biases
    table: int  # the embedding table when it is not the head (a token reads one row)
    embed_rows: int  # d


def weight_sizes(cfg: configs.ModelConfig, params: r1jax.Params) -> WeightSizes:
    body = experts = head = vectors = table = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(dataclasses.replace(params, mtp=None))[0]:
        names = [str(getattr(k, "name", getattr(k, "key", ""))) for k in path]
        size = int(np.prod(leaf.shape))
        if names[0] == "embed":
            head, table = (head + size, table) if cfg.tie_word_embeddings else (head, table + size)
        elif names[0] == "lm_head":
            head += size
        elif names[-1].endswith("norm") or names[-1].endswith("bias"):
            vectors += size
        elif names[0] == "moe_layers" and names[-2] == "mlp" and names[-1] in ("gate", "up", "down"):
            experts += size
        else:
            body += size
    return WeightSizes(body, experts, head, vectors, table, cfg.hidden_size)


def attention_flops(cfg: configs.ModelConfig, keys: np.ndarray, decode: bool) -> float:
    """FLOPs of one query attending over `keys` keys in one layer, summed over `keys`."""
    n = cfg.num_attention_heads
    s = float(np.sum(keys))
    if not cfg.is_mla:
        return 4.0 * n * cfg.gqa_head_dim * s
    if decode:
        return 2.0 * n * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * s
    return 2.0 * n * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * s


def generate_cost(cfg: configs.ModelConfig, w: WeightSizes, batch: int, prompt: int,
                  new: int) -> dict:
    """FLOPs and bytes of prefill and of all decode steps (see the module docstring)."""
    layers = cfg.num_hidden_layers
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    active = w.body + (w.experts * k / e if e else 0)
    cache_values = cache_lib.values_per_token_per_layer(cfg)

    prefill_flops = batch * (prompt * 2 * active + 2 * w.head
                             + layers * attention_flops(cfg, np.arange(1, prompt + 1), decode=False))
    prefill_bytes = BYTES * (w.body + w.experts + w.head + w.vectors
                             + batch * prompt * (w.embed_rows + layers * cache_values))

    steps = np.arange(1, new)  # decode step j feeds token j (the first comes from prefill)
    keys = prompt + steps
    decode_flops = batch * (len(steps) * (2 * active + 2 * w.head)
                            + layers * attention_flops(cfg, keys, decode=True))
    touched = 1 - (1 - k / e) ** batch if e else 0.0  # expected fraction of experts read
    step_weights = w.body + w.experts * touched + w.head + w.vectors + batch * w.embed_rows
    decode_bytes = BYTES * (len(steps) * step_weights + batch * layers * cache_values * float(np.sum(keys)))
    return {"prefill_flops": prefill_flops, "prefill_bytes": prefill_bytes,
            "decode_flops": decode_flops, "decode_bytes": decode_bytes,
            "flops": prefill_flops + decode_flops, "bytes": prefill_bytes + decode_bytes,
            "active_params_per_token": active + w.head}


# r1jax ----------------------------------------------------------------------------------------

def random_prompts(cfg, batch: int, prompt_len: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, cfg.vocab_size, size=(batch, prompt_len), dtype=np.int32)
    return tokens, np.full((batch,), prompt_len, np.int32)


def time_r1jax(params, cfg, tokens, lengths, scfg: SamplingConfig, repeats: int, seed: int):
    key = jax.random.key(seed)
    toks, lens = jnp.asarray(tokens), jnp.asarray(lengths)
    start = time.perf_counter()
    out = jax.block_until_ready(sample(params, cfg, toks, lens, key, scfg))
    compile_s = time.perf_counter() - start
    med, times = common.median_time(lambda: sample(params, cfg, toks, lens, key, scfg), repeats)
    return med, times, compile_s, out


# Hugging Face ---------------------------------------------------------------------------------

def peer_available() -> Optional[str]:
    """None when torch and transformers are installed, else why not (nothing is imported:
    PyTorch runs in a child process, see hf_peer.py)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def run_peer(cfg, params, prompts: dict, args) -> dict:
    """Writes the weights (`r1jax.save_hf`) and inputs, runs hf_peer.py in a child process,
    returns its JSON: logits_max_abs_diff and runs[batch] = {median_s, times_s}."""
    with tempfile.TemporaryDirectory(prefix="r1jax_bench_") as folder:
        r1jax.save_hf(os.path.join(folder, "model"), cfg, params)
        check, _ = random_prompts(cfg, 2, 16, args.seed + 1)
        logits = np.asarray(r1jax.forward(params, jnp.asarray(check), cfg, with_mtp=False).logits)
        np.savez(os.path.join(folder, "inputs.npz"), check_tokens=check, check_logits=logits,
                 **{f"prompt_{b}": tokens for b, tokens in prompts.items()})
        out = os.path.join(folder, "hf.json")
        cmd = [sys.executable, os.path.join(HERE, "hf_peer.py"), "--model-dir", os.path.join(folder, "model"),
               "--inputs", os.path.join(folder, "inputs.npz"), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--threads", str(args.torch_threads), "--out", out,
               *common.peer_malloc_args(args)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-15:])
            raise RuntimeError(f"hf_peer.py failed (exit {proc.returncode}):\n{tail}")
        with open(out) as f:
            return json.load(f)


# MTP speculative decoding -------------------------------------------------------------------

def measure_speculative(cfg, batch, args, limits_repeats):
    cfg = cfg.replace(num_nextn_predict_layers=1)
    params = r1jax.init_params(jax.random.key(args.seed), cfg)
    tokens, lengths = random_prompts(cfg, batch, args.prompt_len, args.seed + 7)
    base = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    plain_s, plain_times, _, plain = time_r1jax(params, cfg, tokens, lengths, base, limits_repeats,
                                                args.seed)
    spec_cfg = dataclasses.replace(base, speculative=True)
    spec_s, spec_times, _, spec = time_r1jax(params, cfg, tokens, lengths, spec_cfg, limits_repeats,
                                             args.seed)
    same = float(np.mean(np.asarray(plain.tokens) == np.asarray(spec.tokens)))
    return {"batch": batch, "temperature": 0.0,
            "plain_tokens_per_s": batch * args.new_tokens / plain_s,
            "speculative_tokens_per_s": batch * args.new_tokens / spec_s,
            "speedup": plain_s / spec_s, "acceptance_rate": spec.acceptance_rate,
            "greedy_tokens_equal": same, "plain_times_s": plain_times, "speculative_times_s": spec_times}


def measure_speculative_trained(args) -> dict:
    """MTP speculative decoding on the toy base model, whose MTP module is trained."""
    sys.path.insert(0, os.path.dirname(HERE))  # examples/: pretrain_tiny and workdir
    import pretrain_tiny
    from r1jax.data import tasks, templates

    prompt_len, new = 20, 24  # the main example's defaults; the toy model's positions end at 44
    cfg, params, tokenizer = pretrain_tiny.pretrain(pathlib.Path(args.toy_workdir), model="moe",
                                                    steps=args.toy_steps, seq_len=prompt_len + new,
                                                    quiet=True)
    out = {"model": "toy DeepSeek-V3-shaped base (examples/pretrain_tiny.py)", "params": r1jax.param_count(cfg),
           "pretrain_steps": args.toy_steps, "prompt_len": prompt_len, "new_tokens": new, "runs": []}
    for batch in (args.spec_batch_size,) if args.quick else (args.spec_batch_size, 4 * args.spec_batch_size):
        prompts = [tokenizer.encode(templates.short_prompt(tasks.arithmetic_example(1, i)["question"]))
                   [:prompt_len] for i in range(batch)]
        tokens = np.zeros((batch, prompt_len), np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
        lengths = np.array([len(ids) for ids in prompts], np.int32)
        for temperature in (0.0, 1.0):
            base = SamplingConfig(max_new_tokens=new, temperature=temperature,
                                  stop_token_ids=tuple(cfg.eos_token_id or ()))
            plain_s, _, _, plain = time_r1jax(params, cfg, tokens, lengths, base, args.repeats, args.seed)
            spec_s, _, _, spec = time_r1jax(params, cfg, tokens, lengths,
                                            dataclasses.replace(base, speculative=True), args.repeats, args.seed)
            run = {"batch": batch, "temperature": temperature,
                   "plain_tokens_per_s": float(np.sum(np.asarray(plain.lengths))) / plain_s,
                   "speculative_tokens_per_s": float(np.sum(np.asarray(spec.lengths))) / spec_s,
                   "acceptance_rate": spec.acceptance_rate}
            run["speedup"] = run["speculative_tokens_per_s"] / run["plain_tokens_per_s"]
            if temperature == 0:
                run["greedy_tokens_equal"] = float(np.mean(np.asarray(plain.tokens) == np.asarray(spec.tokens)))
            out["runs"].append(run)
            print(f"  toy base, batch {batch}, temperature {temperature:g}: speculative "
                  f"{run['speedup']:.2f}x plain, acceptance {run['acceptance_rate']:.3f}", flush=True)
    return out


# Main ---------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    args.retained_freed_memory = common.apply_malloc_policy(args)  # before any JAX work
    peer_reason = "--skip-peer" if args.skip_peer else peer_available()
    print(f"measuring this machine's limits ({'quick' if args.quick else 'full'})...", flush=True)
    load_before = common.load_average()
    limits = common.measure_limits(args.quick)
    print(f"  matmul {limits.matmul_flops / 1e9:.1f} GFLOP/s, bandwidth "
          f"{limits.bandwidth_bytes / 1e9:.2f} GB/s, matmul weight streaming "
          f"{limits.dot_stream_bytes / 1e9:.2f} GB/s, load average {load_before:.2f}", flush=True)

    record = {"benchmark": "sampling", "machine": common.machine(), "limits": limits.as_dict(),
              "args": {k: v for k, v in vars(args).items()}, "peer": peer_reason or "transformers generate() in a child process",
              "models": {}, "rows": []}
    rows = []
    for name in args.models:
        cfg = model_config(name, args.quick)
        params = r1jax.init_params(jax.random.key(args.seed), cfg, with_mtp=False)
        sizes = weight_sizes(cfg, params)
        per_layer = cache_lib.values_per_token_per_layer(cfg) * BYTES
        full_layer = cache_lib.full_kv_values_per_token_per_layer(cfg) * BYTES
        info = {"preset": (QUICK_MODELS if args.quick else MODELS).get(name, name),
                "params": r1jax.param_count(cfg), "weights": dataclasses.asdict(sizes),
                "cache_bytes_per_token": {"per_layer": per_layer,
                                          "total": per_layer * cfg.num_hidden_layers,
                                          "full_kv_per_layer": full_layer,
                                          "full_kv_total": full_layer * cfg.num_hidden_layers,
                                          "ratio": full_layer / per_layer}}
        record["models"][name] = info
        print(f"{name}: {info['params'] / 1e6:.1f}M parameters, cache {per_layer} B/token/layer "
              f"(full KV {full_layer})", flush=True)

        prompts, model_rows = {}, []
        for batch in args.batch_sizes:
            tokens, lengths = random_prompts(cfg, batch, args.prompt_len, args.seed + batch)
            prompts[batch] = tokens
            scfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
            cost = generate_cost(cfg, sizes, batch, args.prompt_len, args.new_tokens)
            floor = limits.time_floor(cost["flops"], cost["bytes"])
            phased = (limits.time_floor(cost["prefill_flops"], cost["prefill_bytes"])
                      + limits.time_floor(cost["decode_flops"], cost["decode_bytes"]))
            new = batch * args.new_tokens
            row = {"model": name, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, **cost, "floor_s": floor, "floor_phased_s": phased,
                   "floor_tokens_per_s": new / floor, "load_before": common.load_average(),
                   # informational: the decode bytes at the rate matmuls actually stream
                   "floor_dot_stream_s": (limits.time_floor(cost["prefill_flops"], cost["prefill_bytes"])
                                          + max(cost["decode_flops"] / limits.matmul_flops,
                                                cost["decode_bytes"] / limits.dot_stream_bytes))}
            med, times, compile_s, out = time_r1jax(params, cfg, tokens, lengths, scfg, args.repeats,
                                                    args.seed)
            if int(np.min(np.asarray(out.lengths))) != args.new_tokens:
                raise RuntimeError("a row stopped before max_new_tokens although no stop tokens are set")
            row.update(r1jax_s=med, r1jax_times_s=times, r1jax_compile_s=compile_s,
                       r1jax_tokens_per_s=new / med, limit_fraction=floor / med,
                       limit_fraction_phased=phased / med,
                       limit_fraction_dot_stream=row["floor_dot_stream_s"] / med,
                       load_after=common.load_average())
            print(f"  batch {batch}: r1jax {new / med:.1f} tok/s ({med:.2f} s; compile+run "
                  f"{compile_s:.1f} s), limit fraction {floor / med:.2f}", flush=True)
            model_rows.append(row)

        if peer_reason is None:
            load0 = common.load_average()
            try:
                hf = run_peer(cfg, params, prompts, args)
            except RuntimeError as e:  # a failing peer is a finding, not a crash
                print(f"  HF: {e}", flush=True)
                info["hf_error"] = str(e)
                hf = None
            if hf is not None:
                diff = hf["logits_max_abs_diff"]
                info.update(hf_logits_max_abs_diff=diff, hf_logits_match=diff < MATCH_TOLERANCE,
                            hf_class=hf["class"], hf_load_before=load0, hf_load_after=common.load_average())
                print(f"  HF vs r1jax logits: max abs diff {diff:.2e} "
                      f"({'match' if diff < MATCH_TOLERANCE else 'MISMATCH'})", flush=True)
                for row in model_rows:
                    run = hf["runs"][str(row["batch"])]
                    new = row["batch"] * args.new_tokens
                    row.update(hf_s=run["median_s"], hf_times_s=run["times_s"],
                               hf_tokens_per_s=new / run["median_s"], ratio=run["median_s"] / row["r1jax_s"],
                               hf_limit_fraction=row["floor_s"] / run["median_s"])
                    print(f"  batch {row['batch']}: r1jax/HF {row['ratio']:.2f}x", flush=True)
        rows.extend(model_rows)

        if cfg.is_mla and cfg.n_routed_experts and not args.skip_spec:
            spec = measure_speculative(cfg, args.spec_batch_size, args, args.repeats)
            info["speculative"] = spec
            print(f"  MTP speculative (greedy, batch {spec['batch']}): {spec['speedup']:.2f}x plain, "
                  f"acceptance {spec['acceptance_rate']:.3f}, greedy tokens equal "
                  f"{spec['greedy_tokens_equal']:.3f}", flush=True)

    if not args.skip_spec:
        print("MTP speculative decoding on the trained toy base model...", flush=True)
        record["speculative_trained"] = measure_speculative_trained(args)

    record["rows"] = rows
    header = ["model", "batch", "r1jax tok/s", "HF tok/s", "r1jax/HF", "floor tok/s", "limit frac",
              "HF limit frac", "limit frac (dot bw)", "cache B/tok (full KV)", "MTP speedup (accept)"]
    table = []
    for row in rows:
        info = record["models"][row["model"]]
        c = info["cache_bytes_per_token"]
        spec = info.get("speculative")
        table.append([row["model"], row["batch"], row["r1jax_tokens_per_s"], row.get("hf_tokens_per_s"),
                      row.get("ratio"), row["floor_tokens_per_s"], row["limit_fraction"],
                      row.get("hf_limit_fraction"), row["limit_fraction_dot_stream"],
                      f"{c['total']} ({c['full_kv_total']})",
                      f"{spec['speedup']:.2f} ({spec['acceptance_rate']:.2f})" if spec else None])
    print()
    if table:
        print(common.format_table(header, table))
    print(f"limits: matmul {limits.matmul_flops / 1e9:.1f} GFLOP/s, bandwidth "
          f"{limits.bandwidth_bytes / 1e9:.2f} GB/s (matmul weight streaming "
          f"{limits.dot_stream_bytes / 1e9:.2f} GB/s); prompt {args.prompt_len}, new {args.new_tokens}, "
          f"median of {args.repeats}; load average {load_before:.2f} -> {common.load_average():.2f}")
    if "speculative_trained" in record:
        print("MTP speculative decoding, toy base with a trained MTP module (tokens/s of generated tokens):")
        print(common.format_table(
            ["batch", "temperature", "plain tok/s", "speculative tok/s", "speedup", "acceptance"],
            [[r["batch"], r["temperature"], r["plain_tokens_per_s"], r["speculative_tokens_per_s"],
              r["speedup"], r["acceptance_rate"]] for r in record["speculative_trained"]["runs"]]))
    path = common.write_json(args.out, record)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
