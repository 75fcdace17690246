"""Rejection sampling: R1's stage-3 data generation, written as SFT data for `sft.py`.

R1 (section 2.3.3) samples several responses per prompt from the RL checkpoint, keeps
only the correct ones and fine-tunes on them. This script does that with rule rewards:
G samples per prompt, scored with `rewards.math_accuracy` (or `rewards.countdown_reward`)
and `rewards.format_reward`; a sample is kept when its answer is correct, its format is
right and it ended with a stop token. It writes `{"prompt", "completion"}` JSONL and
prints acceptance statistics (also saved as `rejection_stats.json` in `--workdir`).

Run (CPU, after `r1_zero.py` trained a policy with `--toy-model moe`, its default):

    python examples/rejection_sample.py --checkpoint runs/r1_zero --num-prompts 256 \\
        --num-generations 8 --out runs/rejection/sft.jsonl
    python examples/sft.py --data runs/rejection/sft.jsonl --init-from runs/r1_zero/base

With a Hugging Face model on GSM8K, at most 2 answers per problem, shortest first:

    python examples/rejection_sample.py --base /path/to/model --dataset gsm8k \\
        --manual-dir /path/to/gsm8k --template r1_zero --max-new-tokens 1024 \\
        --max-per-prompt 2 --select shortest

Departures from the paper: only rule-verifiable prompts (R1 also used DeepSeek-V3 as a
judge for other data and filtered out mixed-language, overlong and code-block answers),
and duplicate completions of one prompt are kept once.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import generate  # noqa: E402
import pretrain_tiny  # noqa: E402
import workdir as wd  # noqa: E402

from r1jax.data import sources  # noqa: E402
from r1jax.data.iterator import epoch_order  # noqa: E402
from r1jax.data.padding import tokenize_prompts  # noqa: E402
from r1jax.data.tokenizer import CharTokenizer  # noqa: E402
from r1jax.rl import rewards  # noqa: E402
from r1jax.sampling import FINISHED_STOP, SamplingConfig, sample  # noqa: E402


def score(dataset: str, completion: str, example: dict,
          prompt_has_think: bool) -> tuple[float, float]:
    """(accuracy, format) of one completion, each 0.0 or 1.0."""
    if dataset == "countdown":
        accuracy = rewards.countdown_reward(completion, example["numbers"], example["target"])
    else:
        accuracy = rewards.math_accuracy(completion, example["answer"])
    return float(accuracy), float(rewards.format_reward(completion, prompt_has_think))


def select(accepted: list[tuple[str, int]], max_per_prompt: int, how: str) -> list[tuple[str, int]]:
    """At most `max_per_prompt` (0: all) distinct (completion, length) pairs: shortest or first."""
    seen, distinct = set(), []
    for completion, n in accepted:
        if completion not in seen:
            seen.add(completion)
            distinct.append((completion, n))
    if how == "shortest":
        distinct = sorted(distinct, key=lambda cn: cn[1])
    return distinct[:max_per_prompt] if max_per_prompt else distinct


def run(args) -> dict:
    timer = wd.Timer()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = pathlib.Path(args.out) if args.out else workdir / "sft.jsonl"
    model = generate.load_model(args, seed=args.seed)
    tokenizer = model.tokenizer
    template = args.template if args.template != "auto" else (
        "short" if isinstance(tokenizer, CharTokenizer) else "r1_zero")
    prompt_has_think = template == "short"

    config = {}
    if args.dataset == "arithmetic":
        config = {"difficulty": args.difficulty, "num_train": args.num_train,
                  "num_test": args.num_test}
    data_dir = pathlib.Path(args.data_dir) if args.data_dir else workdir / "data"
    source = sources.load_source(args.dataset, args.split, data_dir, args.manual_dir, **config)
    order = epoch_order(len(source), args.seed, 0)[:args.num_prompts]
    examples = []
    for i in order:
        record = source[int(i)]
        question, answer = sources.question_and_answer(args.dataset, record)
        examples.append({**record, "question": question, "answer": answer})
    prompts = [generate.apply_template(template, ex["question"]) for ex in examples]

    G, chunk = args.num_generations, args.prompts_per_batch
    stop = tuple(sorted({*model.cfg.eos_token_id, tokenizer.eos_id} - {None}))
    scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, stop_token_ids=stop, pad_id=tokenizer.pad_id,
                          return_logprobs=False, samples_per_prompt=G)
    prompt_len = max(len(tokenizer.encode(p, add_bos=args.add_bos)) for p in prompts)
    counts = {"samples": 0, "correct": 0, "format_ok": 0, "stopped": 0, "accepted": 0}
    kept: list[list[tuple[str, int]]] = [[] for _ in examples]
    bar = tqdm(range(0, len(examples), chunk), desc="rejection sampling", disable=args.quiet)
    for first in bar:
        idx = list(range(first, min(first + chunk, len(examples))))
        padded = idx + [idx[0]] * (chunk - len(idx))  # every batch the same shape: one compile
        tokens, lengths = tokenize_prompts(tokenizer, [prompts[i] for i in padded], prompt_len,
                                           add_bos=args.add_bos)
        out = sample(model.params, model.cfg, tokens, lengths,
                     jax.random.fold_in(jax.random.key(args.seed), first), scfg)
        out_tokens, out_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        stopped = np.asarray(out.finish_reason) == FINISHED_STOP
        for row in range(len(idx) * G):
            i = idx[row // G]
            n = int(out_lengths[row])
            completion = tokenizer.decode(out_tokens[row, :n])
            accuracy, fmt = score(args.dataset, completion, examples[i], prompt_has_think)
            ok = accuracy == 1.0 and (fmt == 1.0 or not args.require_format) and bool(stopped[row])
            counts["samples"] += 1
            counts["correct"] += accuracy == 1.0
            counts["format_ok"] += fmt == 1.0
            counts["stopped"] += bool(stopped[row])
            counts["accepted"] += ok
            if ok:
                kept[i].append((completion, n))
        bar.set_postfix(accepted=f"{counts['accepted'] / counts['samples']:.2f}")

    written, lengths_written = 0, []
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for prompt, accepted in zip(prompts, kept):
            for completion, n in select(accepted, args.max_per_prompt, args.select):
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
                written += 1
                lengths_written.append(n)
    stats = {
        "prompts": len(examples), "samples": counts["samples"],
        "accuracy": counts["correct"] / max(counts["samples"], 1),
        "format_rate": counts["format_ok"] / max(counts["samples"], 1),
        "stopped_rate": counts["stopped"] / max(counts["samples"], 1),
        "acceptance_rate": counts["accepted"] / max(counts["samples"], 1),
        "prompts_with_accepted": sum(bool(k) for k in kept),
        "written": written,
        "mean_written_tokens": float(np.mean(lengths_written)) if lengths_written else 0.0,
        "out": str(out_path), "model": model.source, "wall_seconds": timer.seconds(),
    }
    (workdir / "rejection_stats.json").write_text(json.dumps(stats, indent=2))
    print(f"\n{stats['prompts']} prompts x {G} samples: accuracy {stats['accuracy']:.3f}, format "
          f"{stats['format_rate']:.3f}, stopped {stats['stopped_rate']:.3f}, accepted "
          f"{stats['acceptance_rate']:.3f}; {stats['prompts_with_accepted']} prompts with an "
          f"accepted sample; wrote {written} examples (mean {stats['mean_written_tokens']:.1f} "
          f"tokens) to {out_path}")
    return stats


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workdir", default="runs/rejection")
    g.add_argument("--out", default=None, help="SFT JSONL to write (default: WORKDIR/sft.jsonl)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true")
    generate.add_model_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="arithmetic",
                   choices=["arithmetic", "countdown", "gsm8k", "math"])
    g.add_argument("--split", default="train")
    g.add_argument("--data-dir", default=None, help="built datasets (default: WORKDIR/data)")
    g.add_argument("--manual-dir", default=None, help="folder with the downloaded GSM8K/MATH files")
    g.add_argument("--difficulty", type=int, default=1)
    g.add_argument("--num-train", type=int, default=pretrain_tiny.TRAIN_EXAMPLES)
    g.add_argument("--num-test", type=int, default=128)
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--template", default="auto", choices=["auto", "short", "r1_zero", "chat"],
                   help="auto: short for the character tokenizer, else r1_zero")
    g.add_argument("--add-bos", action="store_true")
    g = p.add_argument_group("sampling")
    g.add_argument("--num-generations", type=int, default=8, help="G samples per prompt")
    g.add_argument("--prompts-per-batch", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=24)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g = p.add_argument_group("selection")
    g.add_argument("--max-per-prompt", type=int, default=0,
                   help="K answers kept per prompt (0: all)")
    g.add_argument("--select", default="shortest", choices=["shortest", "first"])
    g.add_argument("--require-format", action=argparse.BooleanOptionalAction, default=True,
                   help="also require the <think>/<answer> format")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
