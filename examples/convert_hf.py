"""Hugging Face folder <-> orbax checkpoint, with a logit check of the round trip.

Run:

    # HF -> orbax: OUT/checkpoints/0 holds {"params": Params}, the config in its metadata,
    # and the tokenizer files are copied to OUT (so generate.py --checkpoint OUT works)
    python examples/convert_hf.py --to-orbax /path/to/Qwen2.5-0.5B runs/qwen_orbax

    # orbax -> HF: any checkpoint of these examples (for pretrain_tiny / r1_zero ones,
    # which store no config, say which toy model they trained)
    python examples/convert_hf.py --to-hf runs/sft runs/sft_hf
    python examples/convert_hf.py --toy-model moe --to-hf runs/r1_zero runs/r1_zero_hf

After writing, the script reads the result back, runs both models on a few random
tokens and prints the largest logit difference (0 for float32; `--dtype bfloat16`
rounds the weights, so expect about 1e-2). `--tolerance` turns a larger one into an error.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import generate  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402


def max_logit_diff(a_cfg, a_params, b_cfg, b_params, num_tokens: int = 16, seed: int = 0) -> float:
    """Largest |logit difference| of two models on the same 2 x num_tokens random tokens."""
    tokens = jax.random.randint(jax.random.key(seed), (2, num_tokens), 0, a_cfg.vocab_size,
                                jnp.int32)
    a = r1jax.forward(a_params, tokens, a_cfg).logits
    b = r1jax.forward(b_params, tokens, b_cfg).logits
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def to_orbax(hf_dir: pathlib.Path, out: pathlib.Path, dtype: str) -> float:
    cfg, params = r1jax.load_hf(hf_dir, dtype=jnp.dtype(dtype))
    handle = ckpt.open_checkpoints(out / "checkpoints", max_to_keep=None)
    try:
        if ckpt.latest_step(handle) is not None:
            raise SystemExit(f"{out / 'checkpoints'} already holds a checkpoint; choose a new "
                             "output folder")
        ckpt.save(handle, 0, {"params": params},
                  {**generate.model_metadata(cfg), "source": str(hf_dir)}, force=True)
    finally:
        ckpt.close(handle)
    generate.copy_tokenizer(hf_dir, out)
    count = r1jax.param_count(cfg, with_mtp=True)
    print(f"wrote {out}/checkpoints/0 ({count:,} parameters, {dtype})")
    back = generate.load_checkpoint(out)
    return max_logit_diff(cfg, params, back.cfg, back.params)


def to_hf(ckpt_dir: pathlib.Path, out: pathlib.Path, step, toy_model: str, dtype) -> float:
    model = generate.load_checkpoint(ckpt_dir, step=step, toy_model=toy_model)
    r1jax.save_hf(out, model.cfg, model.params, dtype=None if dtype is None else jnp.dtype(dtype))
    if model.tokenizer_dir is not None:
        generate.copy_tokenizer(model.tokenizer_dir, out)
    print(f"wrote Hugging Face folder {out} from {model.source}"
          + ("" if model.tokenizer_dir else " (no tokenizer.json to copy)"))
    cfg, params = r1jax.load_hf(out, dtype=jnp.float32)
    return max_logit_diff(model.cfg, model.params, cfg, params)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("direction").add_mutually_exclusive_group(required=True)
    g.add_argument("--to-orbax", nargs=2, metavar=("HF_DIR", "OUT_DIR"))
    g.add_argument("--to-hf", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"),
                   help="a work directory (or its checkpoints/ folder) of one of the examples")
    g = p.add_argument_group("options")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="parameter dtype written (default: float32 for --to-orbax, the "
                        "checkpoint's for --to-hf)")
    g.add_argument("--step", type=int, default=None,
                   help="--to-hf: checkpoint step (default: newest)")
    g.add_argument("--toy-model", default="moe", choices=["moe", "dense"],
                   help="--to-hf: config of a pretrain_tiny / r1_zero checkpoint (they store none)")
    g.add_argument("--tolerance", type=float, default=None,
                   help="fail if the logit difference is larger")
    args = p.parse_args(argv)

    if args.to_orbax:
        src, out = map(pathlib.Path, args.to_orbax)
        diff = to_orbax(src, out, args.dtype or "float32")
    else:
        src, out = map(pathlib.Path, args.to_hf)
        diff = to_hf(src, out, args.step, args.toy_model, args.dtype)
    print(f"round trip: max |logit difference| = {diff:.3g}")
    if args.tolerance is not None and not diff <= args.tolerance:  # NaN fails too
        raise SystemExit(f"logit difference {diff:.3g} exceeds --tolerance {args.tolerance}")
    return diff


if __name__ == "__main__":
    main()
