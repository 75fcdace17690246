"""Pretrain a tiny DeepSeek-V3-shaped model (MLA, DeepSeekMoE, MTP) from scratch on the
built-in arithmetic task: next-token + MTP loss, auxiliary-loss-free router balancing.

Run (CPU, about 3 minutes):

    python examples/pretrain_tiny.py --workdir runs/pretrain_tiny

The corpus stands in for a base model's web text: each document is an arithmetic
question in the short R1-Zero-style template, followed by a worked answer. Two
departures from clean data make the base model imperfect in the way R1-Zero's base
was: only `--template-rate` of the documents use the `<answer>` tags (the rest give a
bare number after `</think>`), and `--noise` of the worked answers are wrong. The
model therefore learns the skill and the format, but does not reliably use either;
`r1_zero.py` then shows RL with rule rewards alone making it do so.

Resumes from its work directory; writes metrics.jsonl, pretrain.png and checkpoints.

Across processes (see `r1_zero.py`'s docstring for a 2-process command): `--mesh` spans
every process's devices, each process encodes only its rows of each batch, and the
checkpoints are written by all of them together.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import workdir as wd  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402
from r1jax import sharding as shd  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.data import tasks, templates  # noqa: E402
from r1jax.data.tokenizer import CharTokenizer  # noqa: E402

TRAIN_SEED = 0  # arithmetic_example stream of the training documents and RL prompts
TRAIN_EXAMPLES = 20_000  # documents cycle over the examples of the TFDS train split


def toy_config(kind: str, vocab_size: int, seq_len: int = 64) -> r1jax.ModelConfig:
    """The toy base model: 'moe' is DeepSeek-V3-shaped (MLA + MoE + MTP), 'dense' Qwen2-shaped."""
    if kind == "moe":
        return r1jax.configs.tiny_moe(
            vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=96, intermediate_size=256, n_group=2, topk_group=1,
            max_position_embeddings=seq_len, num_nextn_predict_layers=1, bos_token_id=None,
            eos_token_id=(CharTokenizer().eos_id,),
            rope_scaling=r1jax.configs.RopeScaling(), aux_loss_alpha=1e-4)
    if kind == "dense":
        return r1jax.configs.tiny_dense(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=seq_len, bos_token_id=None, eos_token_id=(CharTokenizer().eos_id,))
    raise ValueError(f"--model must be 'moe' or 'dense', got {kind!r}")


def column_steps(a: int, op: str, b: int, slip: int = 0, slip_at: int = 0) -> tuple[str, int]:
    """Column arithmetic, units first: 56+85 -> ('6+5=11 5+8+1=14', 141).

    Each step is a one-digit fact, so the task is learnable from a few hundred batches;
    `slip` adds an arithmetic mistake to step `slip_at`, carried through to the answer.
    """
    steps, digits, carry = [], [], 0
    width = max(len(str(a)), len(str(b)))
    for i in range(width):
        x, y = a // 10 ** i % 10, b // 10 ** i % 10
        if op == "+":
            value = x + y + carry + (slip if i == slip_at else 0)
            steps.append(f"{x}+{y}{'+1' if carry else ''}={value}")
            carry, digit = value // 10, value % 10
        else:
            top = x - carry
            borrow = int(top < y)
            value = top + 10 * borrow - y + (slip if i == slip_at else 0)
            steps.append(f"{x}{'-1' if carry else ''}{'+10' if borrow else ''}-{y}={value}")
            carry, digit = borrow, value % 10
        digits.append(digit)
    if op == "+" and carry:
        digits.append(carry)
    return " ".join(steps), int("".join(map(str, reversed(digits))))


def corpus_document(index: int, difficulty: int, noise: float, template_rate: float) -> str:
    """Document `index`: a prompt and a worked answer (column steps, then the result),
    with an arithmetic slip with probability `noise`, in the tagged template with
    probability `template_rate`."""
    ex = tasks.arithmetic_example(TRAIN_SEED, index % TRAIN_EXAMPLES, difficulty)
    rng = np.random.default_rng([TRAIN_SEED, 7, index])
    expression = ex["solution"].split("=")[0]
    op = "+" if "+" in expression else "-"
    a, b = (int(v) for v in expression.split(op))
    slip = int(rng.choice([-1, 1])) if rng.random() < noise else 0
    reasoning, result = column_steps(a, op, b, slip, int(rng.integers(2)))
    if result < 0:  # a slip below zero: keep the document clean instead
        reasoning, result = column_steps(a, op, b)
    prompt = templates.short_prompt(ex["question"])
    if rng.random() < template_rate:
        return prompt + templates.short_completion(reasoning, str(result))
    return prompt + f"{reasoning}</think>{result}"


def encode(tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [b, seq_len] tokens (eos appended) and the mask of real tokens."""
    tokens = np.full((len(docs), seq_len), tokenizer.pad_id, np.int32)
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc, add_eos=True)[:seq_len]
        tokens[i, :len(ids)] = ids
    return tokens, (tokens != tokenizer.pad_id).astype(np.int32)


def pretrain(workdir: pathlib.Path, *, model: str = "moe", steps: int = 1500, batch_size: int = 64,
             seq_len: int = 44, learning_rate: float = 3e-3, difficulty: int = 1, noise: float = 0.35,
             template_rate: float = 0.5, seed: int = 0, router_bias_rate: float = 1e-3,
             mtp_weight: float = 0.3, checkpoint_every: int = 250, quiet: bool = False,
             mesh=None):
    """Trains (or resumes, or just loads when finished) the toy base model.

    With a `mesh` the parameters are created and trained in their shardings on it; in a
    multi-process run (the mesh spans all processes) each process encodes only its rows
    of each batch, and metrics and plots come from process 0.

    Returns (cfg, params, tokenizer)."""
    workdir = pathlib.Path(workdir)
    multi_process = jax.process_count() > 1
    if multi_process and mesh is None:
        raise ValueError("pretrain: a multi-process run needs a mesh over all processes' devices")
    mesh_rules = r1jax.MeshRules(mesh) if mesh is not None else None
    tokenizer = CharTokenizer()
    cfg = toy_config(model, tokenizer.vocab_size, seq_len)
    optimizer = training.make_optimizer(training_schedule(learning_rate, steps), weight_decay=0.01)
    state = training.init_train_state(r1jax.init_params(jax.random.key(seed), cfg, mesh=mesh),
                                      optimizer, jax.random.key(seed + 1))
    handle = ckpt.open_checkpoints(workdir / "checkpoints", max_to_keep=2,
                                   save_interval_steps=checkpoint_every)
    start = 0
    if ckpt.latest_step(handle) is not None:
        state, meta = ckpt.restore(handle, state)
        start = int(meta["next_document"]) // batch_size
    main_process = wd.is_main_process()
    metrics = wd.MetricsFile(workdir / "metrics.jsonl", truncate_after_step=start,
                             writable=main_process)
    if start < steps:
        step_fn = training.make_lm_train_step(cfg, optimizer, mtp_weight=mtp_weight,
                                              router_bias_rate=router_bias_rate,
                                              mesh_rules=mesh_rules)
        # this process's documents of each batch (all of them on one process)
        rows = shd.process_rows(mesh_rules, batch_size) if multi_process else slice(0, batch_size)
        bar = tqdm(range(start, steps), desc="pretrain", disable=quiet or not main_process,
                   initial=start, total=steps)
        for step in bar:
            docs = [corpus_document(step * batch_size + i, difficulty, noise, template_rate)
                    for i in range(rows.start, rows.stop)]
            tokens, mask = encode(tokenizer, docs, seq_len)
            if multi_process:
                tokens, mask = shd.global_batch((tokens, mask), mesh_rules, batch_size)
            state, m = step_fn(state, jnp.asarray(tokens), jnp.asarray(mask))
            if step % 25 == 0 or step == steps - 1:
                record = {"step": step + 1, "loss": float(m["loss"]), "ce": float(m["ce"]),
                          "mtp_loss": float(m.get("mtp_loss", np.nan)),
                          "expert_load_max_over_mean": float(m.get("expert_load_max_over_mean", np.nan))}
                metrics.write(record)
                bar.set_postfix(ce=f"{record['ce']:.3f}", mtp=f"{record['mtp_loss']:.3f}")
            ckpt.save(handle, step + 1, state, {"next_document": (step + 1) * batch_size,
                                                "model_config": r1jax.configs.to_hf_config(cfg)},
                      force=step + 1 == steps)
        ckpt.wait(handle)
        if main_process:
            wd.plot_curves(metrics.read(), ["ce", "mtp_loss", "expert_load_max_over_mean"],
                           workdir / "pretrain.png", "pretraining the toy base model")
    ckpt.close(handle)
    return cfg, state.params, tokenizer


def training_schedule(peak: float, steps: int):
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    import optax

    warmup = max(1, steps // 20)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), peak * 0.1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("run")
    g.add_argument("--workdir", default="runs/pretrain_tiny")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", default="", help='e.g. "fsdp=4" (default: one device; all '
                   'devices on fsdp in a multi-process run)')
    wd.add_host_flags(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="moe", choices=["moe", "dense"])
    g = parser.add_argument_group("data")
    g.add_argument("--difficulty", type=int, default=1)
    g.add_argument("--noise", type=float, default=0.35, help="share of wrong worked answers")
    g.add_argument("--template-rate", type=float, default=0.5, help="share of documents with <answer> tags")
    g.add_argument("--seq-len", type=int, default=44)
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1500)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--learning-rate", type=float, default=3e-3)
    g.add_argument("--mtp-weight", type=float, default=0.3, help="lambda of the MTP loss")
    g.add_argument("--router-bias-rate", type=float, default=1e-3, help="gamma of the bias update")
    g.add_argument("--checkpoint-every", type=int, default=250)
    args = parser.parse_args(argv)
    wd.init_hosts(args)
    mesh = r1jax.make_mesh(args.mesh) if args.mesh or jax.process_count() > 1 else None
    pretrain(pathlib.Path(args.workdir), model=args.model, steps=args.steps, batch_size=args.batch_size,
             seq_len=args.seq_len, learning_rate=args.learning_rate, difficulty=args.difficulty,
             noise=args.noise, template_rate=args.template_rate, seed=args.seed,
             router_bias_rate=args.router_bias_rate, mtp_weight=args.mtp_weight,
             checkpoint_every=args.checkpoint_every, mesh=mesh)
    if wd.is_main_process():
        print(f"wrote {args.workdir}/metrics.jsonl, pretrain.png and checkpoints/")


if __name__ == "__main__":
    main()
