"""The TRL side of `grpo_step.py`: `trl.GRPOTrainer` steps, run in their own process (no JAX here).

Why a separate process: see hf_peer.py (PyTorch's CPU kernels slow down 10-25x in a process
where XLA has run). `grpo_step.py` writes r1jax's weights with `r1jax.save_hf` and the inputs,
then calls

    python examples/benchmarks/trl_peer.py --model-dir DIR/model --inputs DIR/inputs.npz \
        --num-generations 8 --new-tokens 128 --beta 0.04 --learning-rate 1e-6 --repeats 3 \
        --threads 2 --out DIR/trl.json

`inputs.npz` holds `prompts` [b, P] int32 (the prompt token ids, the same every step),
`check_tokens` [2, t] and `check_logits` [2, t, v] (r1jax's logits for them: the
identical-weights check). The prompts reach TRL as text through a word-level tokenizer
whose word "t<i>" is token id i (`id_tokenizer`), so TRL's own tokenisation yields
exactly these ids (checked on every step); the reward is `even_token_reward` of the
completion ids, the same function r1jax's side scores with.

TRL settings that match r1jax's step (see grpo_step.py): loss_type='grpo' (per-sequence
token mean, then mean over sequences = r1jax 'sequence_mean'), beta and the k3 KL with a
reference model loaded from the same folder, epsilon 0.2, num_iterations=1,
scale_rewards='group' (unbiased std, as r1jax), per-device batch = prompts x G (one
generation per optimizer step), gradient accumulation 1, AdamW (b1 0.9, b2 0.95, eps 1e-8,
no weight decay), constant learning rate, max grad norm 1, float32 (bf16 off), gradient
checkpointing off, temperature 1 / top-p 1 / top-k 0, and `min_new_tokens = max_new_tokens`
so every completion has exactly N tokens (EOS is suppressed until then: no early stops).

Timing: `max_steps = 1 + repeats`; the first step is a warm-up. Per step, a callback takes
the wall time from `on_step_begin` to `on_step_end` (generation, scoring, reference log-probs,
forward + backward, clipping, optimizer step), and wrappers time the trainer's
`_generate_single_turn` (generation), its `_get_per_token_logps_and_entropies` on the
reference model (reference log-probs) and `_generate_and_score_completions` (the whole
rollout); update = step - rollout. The JSON holds the median and all values of each, the
logits check, and the process's peak RSS (VmHWM: see `peak_rss.peak_rss_bytes`).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import numpy as np

from peak_rss import add_retain_flag, keep_freed_heap_memory, peak_rss_bytes


def even_token_reward(ids) -> float:
    """The benchmark's reward: the fraction of completion tokens whose id is even. Needs no
    tokenizer and makes rewards differ within a group, so advantages are non-zero."""
    ids = np.asarray(list(ids), np.int64)
    return float(np.mean(ids % 2 == 0)) if ids.size else 0.0


def id_tokenizer(vocab_size: int):
    """A transformers fast tokenizer whose whitespace-separated word "t<i>" is token id i
    for i >= 2: "t5 t17" -> [5, 17], no special tokens added. Ids 0 and 1 are "<pad>" and
    "<eos>" (special tokens match anywhere in the text, so they must not be "t0" / "t1":
    "t100" would split into "t1" "00")."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<pad>")


def prompt_text(ids) -> str:
    return " ".join(f"t{int(i)}" for i in ids)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="a folder written by r1jax.save_hf")
    p.add_argument("--inputs", required=True, help="npz with prompts, check_tokens, check_logits")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON result path")
    add_retain_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    retained = keep_freed_heap_memory() if args.retain_freed_memory else False
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    inputs = np.load(args.inputs)
    prompts = inputs["prompts"]
    n_prompts, g, n_new = len(prompts), args.num_generations, args.new_tokens
    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    tokenizer = id_tokenizer(config.vocab_size)
    dataset = datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in prompts]})

    def reward(prompts, completions, completion_ids, **_):
        return [even_token_reward(ids) for ids in completion_ids]

    reward.__name__ = "even_token_reward"

    with tempfile.TemporaryDirectory(prefix="r1jax_trl_") as out_dir:
        cfg = trl.GRPOConfig(
            output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True,
            logging_steps=1, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            seed=args.seed, dataloader_num_workers=0, shuffle_dataset=False,
            model_init_kwargs={"dtype": torch.float32},
            per_device_train_batch_size=n_prompts * g, gradient_accumulation_steps=1,
            num_generations=g, num_iterations=1, max_steps=1 + args.repeats,
            max_completion_length=n_new, temperature=1.0, top_p=1.0, top_k=0,
            generation_kwargs={"min_new_tokens": n_new},
            loss_type="grpo", beta=args.beta, epsilon=args.epsilon, scale_rewards="group",
            mask_truncated_completions=False,
            learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
            weight_decay=0.0, max_grad_norm=1.0)
        trainer = trl.GRPOTrainer(model=args.model_dir, reward_funcs=reward, args=cfg,
                                  train_dataset=dataset, processing_class=tokenizer)
        steps = []  # one dict of seconds per optimizer step
        current = {}
        expected = {prompt_text(p): [int(i) for i in p] for p in prompts}

        def timed(name, fn, when=None):
            def wrapper(*a, **kw):
                if when is not None and not when(*a, **kw):
                    return fn(*a, **kw)
                start = time.perf_counter()
                out = fn(*a, **kw)
                current[name] = current.get(name, 0.0) + time.perf_counter() - start
                return out
            return wrapper

        generate_single_turn = trainer._generate_single_turn

        def checked_generate(prompt_ids, *a, **kw):
            for ids in prompt_ids:  # TRL tokenised the text into exactly our prompt ids
                if list(ids) not in expected.values():
                    raise RuntimeError(f"TRL's prompt ids {list(ids)[:8]}... are not one of the prompts")
            completion_ids, logprobs = generate_single_turn(prompt_ids, *a, **kw)
            lengths = {len(c) for c in completion_ids}
            if lengths != {n_new}:
                raise RuntimeError(f"TRL generated completions of lengths {sorted(lengths)}, not {n_new}")
            return completion_ids, logprobs

        trainer._generate_single_turn = timed("generate_s", checked_generate)
        trainer._get_per_token_logps_and_entropies = timed(
            "reference_s", trainer._get_per_token_logps_and_entropies,
            when=lambda model, *a, **kw: model is trainer.ref_model)
        trainer._generate_and_score_completions = timed("rollout_s", trainer._generate_and_score_completions)

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, *a, **kw):
                current.clear()
                current["start"] = time.perf_counter()

            def on_step_end(self, *a, **kw):
                step = {k: v for k, v in current.items() if k != "start"}
                step["step_s"] = time.perf_counter() - current["start"]
                step["update_s"] = step["step_s"] - step.get("rollout_s", 0.0)
                steps.append(step)
                print(f"  TRL step {len(steps)}: {step['step_s']:.2f} s (generate "
                      f"{step.get('generate_s', 0):.2f}, reference {step.get('reference_s', 0):.2f}, "
                      f"update {step['update_s']:.2f})", flush=True)

        trainer.add_callback(StepTimer())
        trainer.train()

        diff = None
        if trainer.ref_model is not None:  # the reference model keeps the initial weights
            with torch.no_grad():
                check = torch.from_numpy(inputs["check_tokens"]).long()
                theirs = trainer.ref_model(check).logits.float().numpy()
            diff = float(np.max(np.abs(theirs - inputs["check_logits"])))

    timed_steps = steps[1:] or steps  # the first step is the warm-up
    keys = ("step_s", "generate_s", "reference_s", "rollout_s", "update_s")
    result = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
              "threads": torch.get_num_threads(), "class": type(trainer.model).__name__,
              "retained_freed_memory": retained, "logits_max_abs_diff": diff,
              "warmup": steps[0] if steps else None, "steps": timed_steps,
              "median": {k: statistics.median(s.get(k, 0.0) for s in timed_steps) for k in keys},
              "peak_rss_bytes": peak_rss_bytes(),
              # informational, NOT this process's peak: Linux carries the parent's high-water
              # mark across fork + execve into ru_maxrss, so it is max(parent's, ours)
              "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
