"""Seconds per GRPO step of r1jax against TRL's `GRPOTrainer`, on the same weights, in one run.

Run (from the repository root, in a venv that has r1jax, torch, transformers and trl):

    python examples/benchmarks/grpo_step.py
    python examples/benchmarks/grpo_step.py --repeats 1 --skip-peer
    python examples/benchmarks/grpo_step.py --quick --skip-peer      # tiny, for CI (seconds)

One GRPO step = 8 prompts x G = 8 completions of 128 new tokens (temperature 1, no stop
tokens: every row generates every token), rewards, advantages, reference log-probs (beta =
0.04 > 0, a frozen copy of the initial weights), and one optimizer step on the 64 rows, for
`configs.bench_small_qwen2()` in float32 (`--model` takes any preset name). Prompts are fixed
random token ids (length 64, the same every step); the reward is a deterministic function of
the completion's token ids (`trl_peer.even_token_reward`: the fraction of even ids), so no
tokenizer is involved and both sides do identical work.

- r1jax: the library's own step, composed as `examples/r1_zero.py` does:
  `rl.rollout.collect_groups` over `generate_groups` (sampling, decoding through
  `IdTokenizer` -- ids written as decimal text -- and the reward), `assemble_batch` (layout,
  group advantages and the reference log-probs), then `rl.train.make_train_step`'s jitted
  step (forward + backward, AdamW from `training.make_optimizer`, global-norm clipping 1).
  GRPOConfig: `grpo.grpo_deepseekmath()` with G = 8, beta 0.04, k3 KL, epsilon 0.2, mu = 1,
  'sequence_mean' aggregation, learning rate 1e-6, max_completion_length 128. The sampler
  does not return log-probs (mu = 1 does not use them). One warm-up step (compiles), then
  the median of `--repeats` steps; the phases are timed with `block_until_ready`:
  generate (collect_groups), reference (assemble_batch, almost all of it the reference
  forward), update (train_step).
- TRL: `trl_peer.py` in a child process (see there for every matching setting): the weights
  are written with `r1jax.save_hf` and loaded by TRL from that folder as policy and
  reference model; its logits are first compared with `r1jax.forward` (max abs diff must be
  < 1e-3). Skipped with `--skip-peer` or when torch, transformers or trl cannot be imported.
- The machine's limit, measured in the same run (`common.measure_limits`): P = FLOP/s of a
  2048^3 float32 matmul in JAX. With b rows of T = prompt + N new tokens, A = matmul
  parameters used per token (sampling.py: every weight matrix but the embedding table, the
  output head counted in), L layers, att(s) = GQA attention FLOPs of one query over s keys
  in one layer, 4 * n_heads * head_dim * s:
      generation  F_gen = prefill + decode FLOPs (`sampling.generate_cost`: 2A per token
                  plus attention over the valid cache; the head once per row in prefill)
      reference   F_ref = b * [T * 2(A - H) + N * 2H + L * sum_{i=1..T} att(i)]   (one
                  forward; H = output head parameters, needed at the N completion
                  positions only, as r1jax and TRL both compute it)
      update      F_upd = 3 * F_ref                                      (forward + backward)
      floor = (F_gen + F_ref + F_upd) / P;  limit fraction = floor / measured step time.
  Each phase's floor and fraction is in the JSON too. The target of the open issue:
  r1jax at least 2x faster than TRL's step. r1jax does less work than that floor counts:
  the G rows of a group share their prompt, so its reference and update forward passes
  run each prompt once (`RolloutBatch.group_size`; `--no-share-prompts` turns it off).
  The floor of that work ('floor, prompt once'; `shared_prompt_floor_s` in the JSON)
  counts the prompt's T_p tokens once per group and the N completion tokens per row:
      F_ref' = b/G * [T_p * 2(A - H) + L * sum_{i<=T_p} att(i)]
               + b * [N * 2A + L * sum_{T_p<i<=T} att(i)],   F_upd' = 3 F_ref'.
- Peak host memory: the RSS high-water mark of the process that ran the steps, read right
  after them (r1jax: this process, before the limits are measured; TRL: the child
  process). It is VmHWM from /proc/self/status (`peak_rss.peak_rss_bytes`), the same number
  as `resource.getrusage(RUSAGE_SELF).ru_maxrss` except in a child process, where Linux
  carries the parent's high-water mark across fork + execve into ru_maxrss.

Prints one table and writes a JSON record (`--out`). Other work on the machine skews every
number; the 1-minute load average before and after each measurement is in the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import r1jax
from r1jax import configs, training
from r1jax.rl import grpo, rollout
from r1jax.rl.train import make_train_step
from r1jax.sampling import SamplingConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (examples/benchmarks/common.py)
from peak_rss import peak_rss_bytes  # noqa: E402
from sampling import attention_flops, generate_cost, weight_sizes  # noqa: E402
from trl_peer import even_token_reward  # noqa: E402  (imports numpy and peak_rss only)

DEFAULT_OUT = os.path.join(HERE, "results", "grpo_step.json")
MATCH_TOLERANCE = 1e-3
PHASES = ("generate_s", "reference_s", "update_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--model", default="bench_small_qwen2", help="preset name (default: %(default)s)")
    g.add_argument("--prompts", type=int, default=8, help="prompts per step")
    g.add_argument("--num-generations", type=int, default=8, help="G")
    g.add_argument("--prompt-len", type=int, default=64)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference model)")
    g.add_argument("--learning-rate", type=float, default=1e-6)
    g.add_argument("--quick", action="store_true",
                   help="tiny_dense, 2 prompts x G = 4, 8 + 8 tokens, 1 repeat")
    g = p.add_argument_group("how")
    common.add_malloc_flag(g)
    g.add_argument("--no-share-prompts", action="store_true",
                   help="run every row's prompt through the reference and update forward passes "
                        "(assemble_batch(share_prompts=False))")
    g.add_argument("--repeats", type=int, default=3, help="timed steps; the median is reported")
    g.add_argument("--skip-peer", action="store_true", help="do not run TRL")
    g.add_argument("--torch-threads", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=DEFAULT_OUT, help="JSON path (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {"model": ("bench_small_qwen2", "tiny_dense"), "prompts": (8, 2),
                    "num_generations": (8, 4), "prompt_len": (64, 8), "new_tokens": (128, 8),
                    "repeats": (3, 1)}
        for name, (full, quick) in defaults.items():
            if getattr(args, name) == full:
                setattr(args, name, quick)
    return args


# Prompts, tokenizer and reward -----------------------------------------------------------------

class IdTokenizer:
    """The tokenizer interface `rollout.generate_groups` needs, over token ids written as
    decimal text ("5 17" <-> [5, 17]): the benchmark's prompts are ids, not text."""

    pad_id = 0

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def id_reward(completion: str, **_) -> float:
    return even_token_reward(int(t) for t in completion.split())


def prompt_examples(prompts: np.ndarray) -> list[dict]:
    """The examples `generate_id_groups` reads: {"prompt": ids as decimal text} per row."""
    return [{"prompt": IdTokenizer().decode(p)} for p in prompts]


def generate_id_groups(params, cfg, examples: list[dict], key, num_generations: int,
                       scfg: SamplingConfig, prompt_len: int) -> rollout.Groups:
    """`rollout.generate_groups` over `prompt_examples`, scored by `id_reward`."""
    return rollout.generate_groups(params, cfg, examples, tokenizer=IdTokenizer(),
                                   prompt_fn=lambda ex: ex["prompt"], reward_fn=id_reward,
                                   num_generations=num_generations, scfg=scfg, key=key,
                                   prompt_len=prompt_len)


def random_prompts(cfg, count: int, length: int, seed: int) -> np.ndarray:
    """[count, length] ids in [2, vocab): no pad (0) and no eos (1)."""
    return np.random.default_rng(seed).integers(2, cfg.vocab_size, (count, length), dtype=np.int32)


# Analytic cost ---------------------------------------------------------------------------------

def step_flops(cfg, sizes, rows: int, prompt: int, new: int, group: int) -> dict:
    """FLOPs of each phase of one GRPO step (see the module docstring), and of the forward
    pass with each group's prompt run once ('*_shared')."""
    gen = generate_cost(cfg, sizes, rows, prompt, new)
    t = prompt + new
    body_per_token = 2 * (gen["active_params_per_token"] - sizes.head)
    att = lambda first, last: cfg.num_hidden_layers * attention_flops(  # noqa: E731
        cfg, np.arange(first, last + 1), decode=False)
    forward = rows * (t * body_per_token + new * 2 * sizes.head + att(1, t))
    shared = (rows // group * (prompt * body_per_token + att(1, prompt))
              + rows * (new * (body_per_token + 2 * sizes.head) + att(prompt + 1, t)))
    return {"generate": gen["flops"], "reference": forward, "update": 3 * forward,
            "total": gen["flops"] + 4 * forward, "reference_shared": shared,
            "update_shared": 3 * shared, "total_shared": gen["flops"] + 4 * shared,
            "params_per_token": gen["active_params_per_token"], "tokens": rows * t}


# r1jax -----------------------------------------------------------------------------------------

def run_r1jax(cfg, params, prompts: np.ndarray, args) -> dict:
    """Warm-up step, then `args.repeats` timed GRPO steps; per-phase seconds of each."""
    gcfg = dataclasses.replace(grpo.grpo_deepseekmath(), num_generations=args.num_generations,
                               beta=args.beta, max_completion_length=args.new_tokens,
                               learning_rate=args.learning_rate, temperature=1.0)
    optimizer = training.make_optimizer(gcfg.learning_rate, max_grad_norm=1.0)
    # the train step donates the state's buffers, so the reference model keeps its own copy
    ref_params = jax.tree.map(jnp.copy, params) if gcfg.beta > 0 else None
    state = training.init_train_state(params, optimizer, jax.random.key(args.seed))
    train_step = make_train_step(cfg, gcfg, optimizer)
    scfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=gcfg.temperature,
                          return_logprobs=False)
    examples = prompt_examples(prompts)
    steps = []
    for step in range(1 + args.repeats):
        key = jax.random.fold_in(state.key, step)

        def generate(exs, k):
            return generate_id_groups(state.params, cfg, exs, k, gcfg.num_generations, scfg,
                                      args.prompt_len)

        t0 = time.perf_counter()
        groups, _ = rollout.collect_groups(generate, itertools.repeat(examples), key, len(examples),
                                           gcfg.dynamic_sampling)
        t1 = time.perf_counter()
        batch = jax.block_until_ready(rollout.assemble_batch(
            groups, cfg, gcfg, params=state.params, ref_params=ref_params,
            share_prompts=not args.no_share_prompts))
        t2 = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        if int(groups.lengths.min()) != args.new_tokens:
            raise RuntimeError("a row stopped before max_new_tokens although no stop tokens are set")
        times = {"generate_s": t1 - t0, "reference_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0,
                 "reward": float(groups.rewards.mean()), "loss": float(metrics["loss"]),
                 "kl": float(metrics["kl"]), "grad_norm": float(metrics["grad_norm"])}
        steps.append(times)
        print(f"  r1jax step {step + 1}{' (warm-up, compiles)' if step == 0 else ''}: "
              f"{times['step_s']:.2f} s (generate {times['generate_s']:.2f}, reference "
              f"{times['reference_s']:.2f}, update {times['update_s']:.2f})", flush=True)
    timed = steps[1:]
    median = {k: float(np.median([s[k] for s in timed])) for k in (*PHASES, "step_s")}
    return {"warmup": steps[0], "steps": timed, "median": median,
            "peak_rss_bytes": peak_rss_bytes(),
            "grpo_config": dataclasses.asdict(gcfg)}


# TRL -------------------------------------------------------------------------------------------

def peer_available() -> str | None:
    """None when torch, transformers and trl are installed, else why not (nothing is imported:
    TRL runs in a child process, see trl_peer.py)."""
    missing = [m for m in ("torch", "transformers", "trl", "datasets") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def run_peer(cfg, params, prompts: np.ndarray, args) -> dict:
    """Writes the weights (`r1jax.save_hf`) and inputs, runs trl_peer.py in a child process,
    returns its JSON."""
    with tempfile.TemporaryDirectory(prefix="r1jax_bench_") as folder:
        r1jax.save_hf(os.path.join(folder, "model"), cfg, params)
        check = random_prompts(cfg, 2, 16, args.seed + 1)
        logits = np.asarray(r1jax.forward(params, jnp.asarray(check), cfg, with_mtp=False).logits)
        np.savez(os.path.join(folder, "inputs.npz"), prompts=prompts, check_tokens=check,
                 check_logits=logits)
        out = os.path.join(folder, "trl.json")
        cmd = [sys.executable, os.path.join(HERE, "trl_peer.py"), "--model-dir", os.path.join(folder, "model"),
               "--inputs", os.path.join(folder, "inputs.npz"),
               "--num-generations", str(args.num_generations), "--new-tokens", str(args.new_tokens),
               "--beta", str(args.beta), "--learning-rate", str(args.learning_rate),
               "--repeats", str(args.repeats), "--threads", str(args.torch_threads),
               "--seed", str(args.seed), "--out", out,
               *common.peer_malloc_args(args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:  # stream the step lines, keep the tail for errors
            lines.append(line.rstrip())
            if line.startswith("  TRL step"):
                print(line, end="", flush=True)
        if proc.wait() != 0:
            tail = "\n".join(lines[-20:])
            raise RuntimeError(f"trl_peer.py failed (exit {proc.returncode}):\n{tail}")
        with open(out) as f:
            return json.load(f)


# Main ------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    args.retained_freed_memory = common.apply_malloc_policy(args)  # before any JAX work
    peer_reason = "--skip-peer" if args.skip_peer else peer_available()
    cfg = configs.preset(args.model).replace(dtype="float32", param_dtype="float32")
    params = r1jax.init_params(jax.random.key(args.seed), cfg, with_mtp=False)
    sizes = weight_sizes(cfg, params)
    rows = args.prompts * args.num_generations
    flops = step_flops(cfg, sizes, rows, args.prompt_len, args.new_tokens, args.num_generations)
    prompts = random_prompts(cfg, args.prompts, args.prompt_len, args.seed + 2)
    print(f"{args.model}: {r1jax.param_count(cfg) / 1e6:.1f}M parameters; {args.prompts} prompts x "
          f"G = {args.num_generations}, {args.prompt_len} + {args.new_tokens} tokens; step "
          f"{flops['total'] / 1e12:.3f} TFLOP", flush=True)

    load_before = common.load_average()
    ours = run_r1jax(cfg, params, prompts, args)
    ours.update(load_before=load_before, load_after=common.load_average())
    del params  # donated to the train state

    print(f"measuring this machine's limits ({'quick' if args.quick else 'full'})...", flush=True)
    limits = common.measure_limits(args.quick)
    peak = limits.matmul_flops
    print(f"  matmul {peak / 1e9:.1f} GFLOP/s, load average {common.load_average():.2f}", flush=True)
    floors = {"generate_s": flops["generate"] / peak, "reference_s": flops["reference"] / peak,
              "update_s": flops["update"] / peak, "step_s": flops["total"] / peak}
    shared_floors = {"reference_s": flops["reference_shared"] / peak,
                     "update_s": flops["update_shared"] / peak, "step_s": flops["total_shared"] / peak}
    ours["limit_fraction"] = {k: floors[k] / ours["median"][k] for k in floors}
    ours["shared_prompt_limit_fraction"] = {k: shared_floors[k] / ours["median"][k]
                                            for k in shared_floors}

    record = {"benchmark": "grpo_step", "machine": common.machine(), "limits": limits.as_dict(),
              "args": vars(args), "model": {"preset": args.model, "params": r1jax.param_count(cfg),
                                            "weights": dataclasses.asdict(sizes)},
              "peer": peer_reason or "trl GRPOTrainer in a child process (trl_peer.py)",
              "flops": flops, "floor_s": floors, "shared_prompt_floor_s": shared_floors,
              "r1jax": ours, "trl": None}

    if peer_reason is None:
        load0 = common.load_average()
        # a fresh copy of the initial weights (the step above consumed its own)
        params = r1jax.init_params(jax.random.key(args.seed), cfg, with_mtp=False)
        try:
            theirs = run_peer(cfg, params, prompts, args)
        except RuntimeError as e:  # a failing peer is a finding, not a crash
            print(f"TRL: {e}", flush=True)
            record["trl_error"] = str(e)
            theirs = None
        if theirs is not None:
            diff = theirs["logits_max_abs_diff"]
            theirs.update(load_before=load0, load_after=common.load_average(),
                          logits_match=diff is not None and diff < MATCH_TOLERANCE,
                          limit_fraction={k: floors[k] / theirs["median"][k] for k in floors
                                          if theirs["median"].get(k)})
            record["trl"] = theirs
            record["speedup"] = theirs["median"]["step_s"] / ours["median"]["step_s"]
            print("TRL vs r1jax logits: " + ("not checked (beta = 0: no reference model)" if diff is None
                  else f"max abs diff {diff:.2e} ({'match' if theirs['logits_match'] else 'MISMATCH'})"),
                  flush=True)

    header = ["", "step s", "generate s", "reference s", "update s", "limit frac", "peak RSS GB"]
    table = []
    for name, res in (("r1jax", ours), ("TRL", record["trl"])):
        if res is None:
            continue
        m = res["median"]
        table.append([name, m["step_s"], m["generate_s"], m["reference_s"], m["update_s"],
                      floors["step_s"] / m["step_s"], res["peak_rss_bytes"] / 1e9])
    table.append(["floor", floors["step_s"], floors["generate_s"], floors["reference_s"],
                  floors["update_s"], 1.0, None])
    table.append(["floor, prompt once", shared_floors["step_s"], floors["generate_s"],
                  shared_floors["reference_s"], shared_floors["update_s"], None, None])
    print()
    print(common.format_table(header, table))
    speed = f"; r1jax {record['speedup']:.2f}x TRL (target >= 2x)" if "speedup" in record else \
        f"; TRL not run ({peer_reason or record.get('trl_error', '').splitlines()[0]})"
    print(f"{args.model}, {args.prompts} prompts x G = {args.num_generations}, {args.prompt_len} + "
          f"{args.new_tokens} tokens, beta {args.beta}; median of {args.repeats}; matmul "
          f"{peak / 1e9:.1f} GFLOP/s; load average {load_before:.2f} -> {common.load_average():.2f}{speed}")
    if not args.no_share_prompts:
        print(f"r1jax at {ours['shared_prompt_limit_fraction']['step_s']:.2f} of the floor of the "
              "work it does (each prompt's forward once per group)")
    path = common.write_json(args.out, record)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
