"""Supervised fine-tuning on reasoning traces: R1's cold start, its stage-3 SFT, and the
distillation of R1 into small dense models -- one loop, next-token loss on the answers only.

Run (CPU, toy scale; the data can come from `rejection_sample.py`):

    python examples/rejection_sample.py --checkpoint runs/r1_zero --out runs/traces.jsonl
    python examples/sft.py --data runs/traces.jsonl --init-from runs/r1_zero/base \\
        --workdir runs/sft --steps 200

Distillation into a Hugging Face model, exported back to a Hugging Face folder:

    python examples/sft.py --base /path/to/Qwen2.5-1.5B --data r1_traces.jsonl \\
        --seq-len 4096 --batch-size 32 --learning-rate 1e-5 --steps 2000 \\
        --workdir runs/distill --save-hf runs/distill/hf

Each line of `--data` is `{"prompt": str, "completion": str}` or `{"messages": [{"role",
"content"}, ...]}` (ChatML); only completion / assistant tokens (and the eos after them)
are targets of the loss. With neither `--base` nor `--init-from` a randomly initialised
toy model with the character tokenizer is trained (smoke tests).

Departures from the paper: R1 fine-tunes DeepSeek-V3-Base for 2 epochs on ~800k samples
(stage 3) and gives no further recipe; here the length of the run is `--steps`, examples
are padded (not packed) to `--seq-len` and longer ones are cut on the right, and the
optimiser is AdamW with linear warm-up and cosine decay. For DeepSeek-V3-shaped models
the MTP loss is kept on (`--mtp-weight`).

Resumes from its work directory (the data position is in the checkpoint); writes
metrics.jsonl, sft.png and checkpoints/ (with the model config in their metadata, so
`generate.py --checkpoint` and `convert_hf.py --to-hf` read them without flags).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import generate  # noqa: E402
import pretrain_tiny  # noqa: E402
import workdir as wd  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.data.iterator import Position, iterate  # noqa: E402
from r1jax.data.sft import load_sft_arrays, read_jsonl  # noqa: E402
from r1jax.host_memory import retain_freed_memory  # noqa: E402


def run(args) -> dict:
    timer = wd.Timer()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    read_jsonl(args.data)  # a malformed file fails here, before a large model is loaded
    model = generate.load_model(args, seed=args.seed, toy_seq_len=args.seq_len)
    cfg, tokenizer = model.cfg, model.tokenizer
    if model.tokenizer_dir is not None:  # so that generate.py --checkpoint WORKDIR finds it
        generate.copy_tokenizer(model.tokenizer_dir, workdir)

    tokens, mask, stats = load_sft_arrays(args.data, tokenizer, args.seq_len, add_bos=args.add_bos,
                                          default_system=args.default_system)
    if not args.quiet:
        print(f"model: {model.source}; data: {stats.examples} examples, {stats.target_tokens} "
              f"target tokens ({stats.truncated} cut to --seq-len {args.seq_len}, "
              f"{stats.dropped} dropped)")

    schedule = pretrain_tiny.training_schedule(args.learning_rate, args.steps)
    optimizer = training.make_optimizer(schedule, weight_decay=args.weight_decay)
    state = training.init_train_state(model.params, optimizer, jax.random.key(args.seed))
    # commit every leaf to the device, as the step's outputs are: loaded weights are committed
    # but the fresh counters are not, and that mix would compile the step a second time
    state = jax.device_put(state, jax.devices()[0])
    handle = ckpt.open_checkpoints(workdir / "checkpoints", max_to_keep=2,
                                   save_interval_steps=args.checkpoint_every)
    position = Position()
    if ckpt.latest_step(handle) is not None:
        state, meta = ckpt.restore(handle, state)
        if meta.get("num_examples") != stats.examples:
            raise SystemExit(f"{workdir}: the checkpoint was trained on "
                             f"{meta.get('num_examples')} examples but {args.data} now gives "
                             f"{stats.examples}; use a new --workdir")
        position = Position.from_dict(meta["data_position"])
    start = int(state.step)
    _drop_torn_last_line(workdir / "metrics.jsonl")  # a run killed mid-write
    metrics = wd.MetricsFile(workdir / "metrics.jsonl", truncate_after_step=start)
    if start < args.steps:
        step_fn = training.make_lm_train_step(cfg, optimizer, mtp_weight=args.mtp_weight,
                                              router_bias_rate=args.router_bias_rate,
                                              grad_accum_steps=args.grad_accum_steps)
        batches = iterate(range(len(tokens)), args.batch_size, args.seed, position)
        bar = tqdm(range(start, args.steps), desc="SFT", initial=start, total=args.steps,
                   disable=args.quiet)
        for step in bar:
            rows, position = next(batches)
            state, m = step_fn(state, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]))
            if step % args.log_every == 0 or step == args.steps - 1:
                record = {"step": step + 1, "loss": float(m["loss"]), "ce": float(m["ce"]),
                          "grad_norm": float(m["grad_norm"]),
                          "learning_rate": float(schedule(step)),
                          "target_tokens": int(mask[rows, 1:].sum()),
                          "epoch": position.epoch + position.index / len(tokens)}
                for key in ("mtp_loss", "expert_load_max_over_mean"):
                    if key in m:
                        record[key] = float(m[key])
                metrics.write(record)
                bar.set_postfix(ce=f"{record['ce']:.3f}")
            ckpt.save(handle, step + 1, state,
                      {"data_position": position.to_dict(), "num_examples": stats.examples,
                       "data": str(args.data), **generate.model_metadata(cfg)},
                      force=step + 1 == args.steps)
        ckpt.wait(handle)
        wd.plot_curves(metrics.read(), ["ce", "mtp_loss", "grad_norm", "learning_rate"],
                       workdir / "sft.png",
                       f"SFT on {pathlib.Path(args.data).name} (loss on completion tokens)")
    ckpt.close(handle)

    if args.save_hf:
        r1jax.save_hf(args.save_hf, cfg, state.params)
        if model.tokenizer_dir is not None:
            generate.copy_tokenizer(model.tokenizer_dir, pathlib.Path(args.save_hf))
        print(f"wrote Hugging Face folder {args.save_hf}")
    records = metrics.read()
    summary = {"steps": args.steps, "examples": stats.examples, "wall_seconds": timer.seconds(),
               "first_ce": records[0]["ce"] if records else None,
               "final_ce": records[-1]["ce"] if records else None}
    if not args.quiet:
        print(f"SFT: ce {summary['first_ce']} -> {summary['final_ce']} in {args.steps} steps; "
              f"wrote {workdir}/metrics.jsonl, sft.png and checkpoints/")
    return summary


def _drop_torn_last_line(path: pathlib.Path) -> None:
    """A process killed while appending may leave half a JSON line; drop it before resuming."""
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):
            path.write_text(text[:text.rfind("\n") + 1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--workdir", default="runs/sft")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--log-every", type=int, default=10, help="steps between metrics records")
    g.add_argument("--quiet", action="store_true")
    generate.add_model_flags(p, checkpoint_flag="--init-from")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="JSONL of {prompt, completion} or {messages}")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per example (pad or cut)")
    g.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's bos token")
    g.add_argument("--default-system", default=None,
                   help="system message for chat examples without one")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--learning-rate", type=float, default=1e-3, help="peak of warm-up + cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--mtp-weight", type=float, default=0.3,
                   help="lambda of the MTP loss (models with MTP)")
    g.add_argument("--router-bias-rate", type=float, default=1e-3,
                   help="gamma of the router-bias update (MoE models)")
    g = p.add_argument_group("output")
    g.add_argument("--save-hf", default=None,
                   help="at the end, also write a Hugging Face folder here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    retain_freed_memory()  # before any JAX work: see r1jax.host_memory
    return run(args)


if __name__ == "__main__":
    main()
