"""R1-Zero: reinforcement learning with rule-based rewards, straight from a base model.

The main job. With no flags, on a CPU, it shows the R1-Zero result at toy scale in
about 10 minutes:

    python examples/r1_zero.py

1. obtains a base model: pretrains the toy DeepSeek-V3-shaped model of
   `pretrain_tiny.py` on the built-in arithmetic task (cached in the work directory);
2. evaluates it on held-out problems (pass@1 as in the paper: several samples per
   problem at temperature 0.6, top-p 0.95, averaged);
3. runs GRPO (`r1jax.rl.grpo`) with the paper's two rule rewards, accuracy
   (`rewards.math_accuracy` of the `<answer>`) and format (`rewards.format_reward`),
   no value model, no reward model, no supervised fine-tuning;
4. evaluates again, prints a before/after table, writes `r1_zero.png`,
   `metrics.jsonl` and `summary.json` in `--workdir` (default `runs/r1_zero`).

With flags the same loop runs the real recipe, e.g. Qwen2.5-0.5B on GSM8K:

    python examples/r1_zero.py --base /path/to/Qwen2.5-0.5B --dataset gsm8k \\
        --manual-dir /path/to/gsm8k --template r1_zero --preset r1_zero \\
        --num-generations 16 --max-new-tokens 1024 --learning-rate 3e-6 --mesh fsdp=8

Departures from the paper at toy scale: G = 8 instead of 16, a learning rate suited
to a 2M-parameter model, a short char-level template whose prompt already opens
`<think>`, and 60 steps. The run resumes from its last checkpoint when restarted.

Several processes (JAX's multi-controller runtime; here 2 processes on one machine with
2 simulated CPU devices each, Gloo collectives; on real hosts give each process its own
--process-id and process 0's address, and a work directory they all share):

    export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2
    for i in 0 1; do python examples/r1_zero.py --workdir runs/r1_zero_2p --mesh fsdp=4 \\
        --coordinator localhost:12355 --num-processes 2 --process-id $i & done; wait

The mesh spans every process's devices (default: all on fsdp). Each process reads only
its prompts of each batch (`rollout.process_prompts`), decodes and scores only its own
completions, and feeds its rows of the global batch; the losses are global values, the
same on every process, which each prints per step (`process <i> {...}`). Checkpoints are
written and restored by all processes together (orbax); process 0 builds the dataset and
writes metrics, plots and the summary. Restart the same commands to resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pretrain_tiny  # noqa: E402
import workdir as wd  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402
from r1jax import sharding as shd  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.data import sources, templates  # noqa: E402
from r1jax.data.iterator import Position, iterate  # noqa: E402
from r1jax.data.padding import tokenize_prompts  # noqa: E402
from r1jax.data.tokenizer import HFTokenizer  # noqa: E402
from r1jax.rl import grpo, rewards, rollout  # noqa: E402
from r1jax.rl.train import make_train_step  # noqa: E402
from r1jax.sampling import FINISHED_STOP, SamplingConfig  # noqa: E402


# Rewards ----------------------------------------------------------------------------------------

def make_reward(prompt_has_think: bool, format_weight: float):
    """R1-Zero's rule rewards: accuracy of the final answer + `format_weight` x format."""
    def reward(completion: str, answer: str, **_) -> float:
        accuracy = rewards.math_accuracy(completion, answer)
        return accuracy + format_weight * rewards.format_reward(completion, prompt_has_think)
    return reward


# Evaluation -------------------------------------------------------------------------------------

def evaluate(params, cfg, tokenizer, examples: list[dict], prompt_fn, prompt_has_think: bool,
             key, *, samples_per_problem: int, max_new_tokens: int, prompt_len: int,
             mesh_rules=None, num_problems: int | None = None) -> dict:
    """pass@1 over `samples_per_problem` samples at temperature 0.6 / top-p 0.95: accuracy,
    format rate and mean response length (tokens).

    In a multi-process run `examples` are this process's problems
    (`rollout.process_prompts`), `num_problems` counts those of all processes, and the
    results (means over all problems) are the same on every process."""
    prompts = [prompt_fn(ex) for ex in examples]
    tokens, lengths = tokenize_prompts(tokenizer, prompts, prompt_len)
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.6, top_p=0.95,
                          stop_token_ids=(tokenizer.eos_id,), return_logprobs=False,
                          samples_per_prompt=samples_per_problem)
    out = rollout.sample_rows(params, cfg, tokens, lengths, key, scfg, mesh_rules=mesh_rules,
                              global_rows=None if num_problems is None
                              else num_problems * samples_per_problem)
    out_tokens, out_lengths = out.tokens, out.lengths
    acc, fmt = [], []
    for i in range(len(out_tokens)):
        text = tokenizer.decode(out_tokens[i, :out_lengths[i]])
        acc.append(rewards.math_accuracy(text, examples[i // samples_per_problem]["answer"]))
        fmt.append(rewards.format_reward(text, prompt_has_think))
    return {"accuracy": shd.process_mean(acc), "format_rate": shd.process_mean(fmt),
            "mean_length": shd.process_mean(out_lengths),
            "stopped_rate": shd.process_mean(out.finish_reason == FINISHED_STOP),
            "example": _first_completion(tokenizer, out_tokens, out_lengths)}


def _first_completion(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> str:
    """The first row's completion; in a multi-process run process 0's (the batch's first)."""
    row = np.concatenate([lengths[:1], tokens[0]]).astype(np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        row = np.asarray(multihost_utils.broadcast_one_to_all(row))
    return tokenizer.decode(row[1:1 + row[0]])


# The run ----------------------------------------------------------------------------------------

def load_base(args, workdir: pathlib.Path, mesh):
    """(cfg, params, tokenizer, prompt_fn, prompt_has_think): a HF folder, or the toy base
    model pretrained here on first use."""
    if args.base:
        cfg, params = r1jax.load_hf(args.base, dtype=jnp.dtype(args.param_dtype), mesh=mesh)
        tokenizer = HFTokenizer.from_file(args.base)
        if args.template == "r1_zero":
            return cfg, params, tokenizer, lambda ex: templates.r1_zero_prompt(ex["question"]), False
        return cfg, params, tokenizer, lambda ex: templates.short_prompt(ex["question"]), True
    cfg, params, tokenizer = pretrain_tiny.pretrain(
        workdir / "base", model=args.toy_model, steps=args.pretrain_steps, seq_len=args.prompt_len
        + args.max_new_tokens, quiet=args.quiet, mesh=mesh)
    return cfg, params, tokenizer, lambda ex: templates.short_prompt(ex["question"]), True


def run(args) -> dict:
    """The whole run (after `wd.init_hosts` in a multi-process run); returns the summary."""
    timer = wd.Timer()
    main_process = wd.is_main_process()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = r1jax.make_mesh(args.mesh) if args.mesh or jax.process_count() > 1 else None
    mesh_rules = r1jax.MeshRules(mesh) if mesh is not None else None
    cfg, base_params, tokenizer, prompt_fn, prompt_has_think = load_base(args, workdir, mesh)

    data_dir = workdir / "data"
    config = {"difficulty": args.difficulty, "num_train": args.num_train, "num_test": args.num_eval} \
        if args.dataset == "arithmetic" else {}
    # process 0 builds the dataset files (first run), the others then read them
    train_source, test_source = wd.main_process_first(lambda: tuple(
        sources.load_source(args.dataset, split, data_dir, args.manual_dir, **config)
        for split in ("train", "test")), "r1_zero: dataset")
    num_eval = min(args.num_eval, len(test_source))
    eval_rows = rollout.process_prompts(mesh_rules, num_eval, args.eval_samples)  # this process's
    eval_examples = [_qa(args.dataset, test_source[i]) for i in range(num_eval)[eval_rows]]

    gcfg = dataclasses.replace(
        getattr(grpo, args.preset)(), num_generations=args.num_generations,
        learning_rate=args.learning_rate, beta=args.beta, max_completion_length=args.max_new_tokens)
    optimizer = training.make_optimizer(args.learning_rate, max_grad_norm=1.0)
    state = training.init_train_state(base_params, optimizer, jax.random.key(args.seed))
    # the train step donates the state's buffers, so the reference model keeps its own copy
    ref_params = jax.tree.map(jnp.copy, base_params) if gcfg.beta > 0 else None
    handle = ckpt.open_checkpoints(workdir / "checkpoints", max_to_keep=2,
                                   save_interval_steps=args.checkpoint_every)
    position = Position(0, 0)
    summary_path = workdir / "summary.json"
    before = json.loads(summary_path.read_text())["before"] if summary_path.exists() else None
    if ckpt.latest_step(handle) is not None:
        state, meta = ckpt.restore(handle, state)
        position = Position.from_dict(meta["data_position"])
        before = meta.get("before", before)
    start = int(state.step)
    evaluate_args = dict(samples_per_problem=args.eval_samples, max_new_tokens=args.max_new_tokens,
                         prompt_len=args.prompt_len, mesh_rules=mesh_rules, num_problems=num_eval)
    if before is None:
        before = evaluate(base_params, cfg, tokenizer, eval_examples, prompt_fn, prompt_has_think,
                          jax.random.key(args.seed + 100), **evaluate_args)
        if main_process:
            _print_eval("base model", before)

    reward_fn = make_reward(prompt_has_think, args.format_weight)
    scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=gcfg.temperature,
                          stop_token_ids=(tokenizer.eos_id,), record_experts=args.routing_replay)
    train_step = make_train_step(cfg, gcfg, optimizer, router_bias_rate=args.router_bias_rate,
                                 mesh_rules=mesh_rules)
    # every process walks the same order of records (indices only) and reads only its prompts
    batches = iterate(range(len(train_source)), args.num_prompts, args.seed, position)
    prompt_rows = rollout.process_prompts(mesh_rules, args.num_prompts, gcfg.num_generations)
    positions = []

    def next_examples():
        while True:
            indices, nxt = next(batches)
            positions.append(nxt)
            yield [_qa(args.dataset, train_source[i]) for i in indices[prompt_rows]]

    examples_iter = next_examples()
    metrics = wd.MetricsFile(workdir / "metrics.jsonl", truncate_after_step=start,
                             writable=main_process)
    bar = tqdm(range(start, args.steps), desc="GRPO", initial=start, total=args.steps,
               disable=args.quiet or not main_process)
    for step in bar:
        key = jax.random.fold_in(state.key, step)

        def generate(examples, k):
            return rollout.generate_groups(state.params, cfg, examples, tokenizer=tokenizer,
                                           prompt_fn=prompt_fn, reward_fn=reward_fn,
                                           num_generations=gcfg.num_generations, scfg=scfg, key=k,
                                           prompt_len=args.prompt_len, mesh_rules=mesh_rules,
                                           num_prompts=args.num_prompts)

        groups, info = rollout.collect_groups(generate, examples_iter, key,
                                              prompt_rows.stop - prompt_rows.start,
                                              gcfg.dynamic_sampling)
        batch = rollout.assemble_batch(groups, cfg, gcfg, params=state.params,
                                       ref_params=ref_params, mesh_rules=mesh_rules,
                                       routing_replay=args.routing_replay,
                                       num_prompts=args.num_prompts)
        for _ in range(gcfg.num_iterations):
            state, m = train_step(state, batch)
        # means over the completions of all processes (each scores its own)
        answers = [groups.examples[i // gcfg.num_generations]["answer"]
                   for i in range(len(groups.completions))]
        record = {"step": step + 1, "reward": shd.process_mean(groups.rewards),
                  "format_rate": shd.process_mean([rewards.format_reward(c, prompt_has_think)
                                                   for c in groups.completions]),
                  "accuracy": shd.process_mean([rewards.math_accuracy(c, a)
                                                for c, a in zip(groups.completions, answers)]),
                  "mean_length": shd.process_mean(groups.lengths), "loss": float(m["loss"]),
                  "kl": float(m["kl"]), "entropy": float(m["entropy"]),
                  "clip_frac_high": float(m["clip_frac_high"]), **info}
        if "expert_load_max_over_mean" in m:
            record["expert_load_max_over_mean"] = float(m["expert_load_max_over_mean"])
        metrics.write(record)
        if jax.process_count() > 1:  # every process's view of the (global) step values
            print(f"process {jax.process_index()} {json.dumps(record)}", flush=True)
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                        fmt=f"{record['format_rate']:.2f}")
        ckpt.save(handle, step + 1, state, {"data_position": positions[-1].to_dict(), "before": before,
                                            "model_config": r1jax.configs.to_hf_config(cfg)},
                  force=step + 1 == args.steps)
    ckpt.close(handle)

    after = evaluate(state.params, cfg, tokenizer, eval_examples, prompt_fn, prompt_has_think,
                     jax.random.key(args.seed + 100), **evaluate_args)
    summary = {"before": before, "after": after, "wall_seconds": timer.seconds(),
               "steps": args.steps, "eval_problems": num_eval, "eval_samples": args.eval_samples}
    if main_process:
        summary_path.write_text(json.dumps(summary, indent=2))
        wd.plot_curves(metrics.read(), ["reward", "accuracy", "format_rate", "mean_length"],
                       workdir / "r1_zero.png",
                       "R1-Zero: GRPO with rule rewards (training batches)",
                       hlines={"accuracy": {"held-out before": before["accuracy"],
                                            "after": after["accuracy"]},
                               "format_rate": {"held-out before": before["format_rate"]}})
        _print_table(before, after, summary["wall_seconds"], workdir)
    return summary


def _qa(dataset: str, record: dict) -> dict:
    question, answer = sources.question_and_answer(dataset, record)
    return {"question": question, "answer": answer}


def _print_eval(name: str, result: dict) -> None:
    print(f"{name}: accuracy {result['accuracy']:.3f}, format {result['format_rate']:.3f}, "
          f"mean length {result['mean_length']:.1f}; e.g. {result['example']!r}")


def _print_table(before: dict, after: dict, seconds: float, workdir: pathlib.Path) -> None:
    print(f"\n{'held-out':<16}{'before':>10}{'after':>10}")
    for key in ("accuracy", "format_rate", "mean_length"):
        print(f"{key:<16}{before[key]:>10.3f}{after[key]:>10.3f}")
    print(f"\nwall time {seconds:.0f} s; wrote {workdir}/summary.json, r1_zero.png, metrics.jsonl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workdir", default="runs/r1_zero")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", default="", help='e.g. "fsdp=4,expert=2" (default: one device; all '
                   'devices on fsdp in a multi-process run)')
    g.add_argument("--checkpoint-every", type=int, default=10)
    g.add_argument("--quiet", action="store_true")
    wd.add_host_flags(p)
    g = p.add_argument_group("base model")
    g.add_argument("--base", default=None, help="Hugging Face folder; default: pretrain the toy model")
    g.add_argument("--param-dtype", default="float32")
    g.add_argument("--template", default="short", choices=["short", "r1_zero"])
    g.add_argument("--toy-model", default="moe", choices=["moe", "dense"])
    g.add_argument("--pretrain-steps", type=int, default=400)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "countdown", "gsm8k", "math"])
    g.add_argument("--manual-dir", default=None, help="folder with the downloaded GSM8K/MATH files")
    g.add_argument("--difficulty", type=int, default=1)
    g.add_argument("--num-train", type=int, default=pretrain_tiny.TRAIN_EXAMPLES)
    g.add_argument("--num-eval", type=int, default=128)
    g.add_argument("--eval-samples", type=int, default=4)
    g.add_argument("--prompt-len", type=int, default=20)
    g = p.add_argument_group("GRPO")
    g.add_argument("--preset", default="r1_zero", choices=["r1_zero", "grpo_deepseekmath", "dapo", "dr_grpo"])
    g.add_argument("--steps", type=int, default=60)
    g.add_argument("--num-prompts", type=int, default=16)
    g.add_argument("--num-generations", type=int, default=8, help="G")
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--learning-rate", type=float, default=2e-4)
    g.add_argument("--beta", type=float, default=0.001, help="KL coefficient (0: no reference model)")
    g.add_argument("--format-weight", type=float, default=0.5)
    g.add_argument("--routing-replay", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--router-bias-rate", type=float, default=0.0,
                   help="gamma of the router-bias update during RL (0: frozen)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    wd.init_hosts(args)  # before anything touches JAX's devices
    return run(args)


if __name__ == "__main__":
    main()
