"""Sample from a trained model: completions with their log-probs and why each one stopped.

Run (after `pretrain_tiny.py`, `r1_zero.py` or `sft.py` wrote a work directory):

    python examples/generate.py --checkpoint runs/pretrain_tiny --template short \\
        "What is 56+85?" "What is 12-7?"

    python examples/generate.py --checkpoint runs/r1_zero --prompts-file questions.txt \\
        --num-samples 4 --temperature 0.6 --top-p 0.95

    python examples/generate.py --base /path/to/DeepSeek-R1-Distill-Qwen-1.5B --template chat \\
        "How many primes are below 30?" --max-new-tokens 1024

The model comes from one of three places:

* `--checkpoint DIR`: an orbax checkpoint of these examples -- a work directory (its
  `checkpoints/` is used) or a checkpoint directory itself. `sft.py`, `convert_hf.py` and
  `rejection_sample.py` store the model config in the checkpoint metadata
  (`{"model_config": configs.to_hf_config(cfg)}`); `pretrain_tiny.py` and `r1_zero.py`
  do not, so their toy config is rebuilt from `--toy-model moe|dense` (the flag those
  scripts were run with). The tokenizer is the `tokenizer.json` next to `checkpoints/`
  when there is one, else the character tokenizer of the toy tasks.
* `--base DIR`: a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
* neither: a randomly initialised toy model (for smoke tests only).

`--speculative` uses DeepSeek-V3's MTP module as a draft model (exact: same distribution).

This file also holds `load_model`, which `sft.py`, `rejection_sample.py` and
`convert_hf.py` use to read a model from any of these places.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import pretrain_tiny  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.data import templates  # noqa: E402
from r1jax.data.padding import tokenize_prompts  # noqa: E402
from r1jax.data.tokenizer import CharTokenizer, HFTokenizer  # noqa: E402
from r1jax.sampling import FINISHED_STOP, SamplingConfig, sample  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# Loading a model from a HF folder, a checkpoint of these examples, or nowhere ----------------

@dataclasses.dataclass
class Model:
    cfg: r1jax.ModelConfig
    params: r1jax.Params
    tokenizer: object
    source: str  # where it came from, for messages
    step: Optional[int] = None  # checkpoint step
    tokenizer_dir: Optional[pathlib.Path] = None  # folder of tokenizer.json (None: CharTokenizer)


def add_model_flags(parser: argparse.ArgumentParser, checkpoint_flag: str = "--checkpoint") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--base", default=None, help="Hugging Face folder (config.json + *.safetensors)")
    g.add_argument(checkpoint_flag, dest="checkpoint", default=None,
                   help="work directory (or its checkpoints/ folder) of pretrain_tiny, r1_zero, "
                        "sft or convert_hf")
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    g.add_argument("--toy-model", default="moe", choices=["moe", "dense"],
                   help="config of a checkpoint that stores none (pretrain_tiny, r1_zero), or of "
                        "the random model used when neither --base nor a checkpoint is given")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])


def load_model(args, *, seed: int = 0, toy_seq_len: int = 256) -> Model:
    """From `--base`, from `--checkpoint`, or a random toy model (CharTokenizer)."""
    if args.base and args.checkpoint:
        raise SystemExit("give either --base or a checkpoint (--checkpoint, --init-from), not both")
    if args.base:
        cfg, params = r1jax.load_hf(args.base, dtype=jnp.dtype(args.param_dtype))
        return Model(cfg, params, hf_tokenizer(args.base), f"Hugging Face folder {args.base}",
                     tokenizer_dir=pathlib.Path(args.base))
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, step=args.step, toy_model=args.toy_model)
    tokenizer = CharTokenizer()
    cfg = pretrain_tiny.toy_config(args.toy_model, tokenizer.vocab_size, toy_seq_len)
    return Model(cfg, r1jax.init_params(jax.random.key(seed), cfg), tokenizer,
                 f"random toy model ({args.toy_model})")


def hf_tokenizer(folder) -> HFTokenizer:
    if not (pathlib.Path(folder) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (the model folder needs its "
                                "Hugging Face tokenizer to turn text into tokens)")
    return HFTokenizer.from_file(folder)


def checkpoint_dirs(path) -> tuple[pathlib.Path, pathlib.Path]:
    """(root, checkpoint dir): a work directory holding checkpoints/, or the checkpoint
    directory itself (root = its parent, where a tokenizer.json may lie)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ckpt.CheckpointNotFoundError(
            f"checkpoint {path} does not exist (expected a work directory with a checkpoints/ "
            "folder, or an orbax checkpoint directory)")
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints"
    return path.parent, path


def read_metadata(handle: ckpt.CheckpointHandle, step: int) -> dict:
    """The metadata dict saved with `step`, without reading the arrays (the model config
    is needed to build the restore target)."""
    import orbax.checkpoint as ocp

    try:
        payload = handle.manager.restore(
            step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(payload["metadata"].get("user", {}))
    except Exception as err:  # noqa: BLE001 -- any read failure means an unreadable step
        raise ckpt.CheckpointCorruptError(
            f"checkpoint step {step} in {handle.directory}: cannot read its metadata "
            f"({type(err).__name__}: {str(err)[:200]})") from err


def config_from_metadata(meta: dict, toy_model: Optional[str], vocab_size: int,
                         where: pathlib.Path) -> r1jax.ModelConfig:
    if "model_config" in meta:
        hf = meta["model_config"]
        return r1jax.configs.from_hf_config(hf, param_dtype=hf.get("torch_dtype") or "float32")
    if toy_model is None:
        raise SystemExit(f"{where} stores no model config (written by pretrain_tiny.py or "
                         "r1_zero.py?); pass --toy-model moe|dense as used there")
    return pretrain_tiny.toy_config(toy_model, vocab_size, 256)


def _abstract_train_state(abstract_params, learning_rate, max_grad_norm):
    optimizer = training.make_optimizer(learning_rate, max_grad_norm=max_grad_norm)
    return training.TrainState(params=abstract_params,
                               opt_state=jax.eval_shape(optimizer.init, abstract_params),
                               step=jax.ShapeDtypeStruct((), jnp.int32),
                               key=jax.eval_shape(lambda: jax.random.key(0)))


def restore_params(handle: ckpt.CheckpointHandle, cfg: r1jax.ModelConfig,
                   step: Optional[int] = None) -> r1jax.Params:
    """The parameters of a step holding `{"params": Params}` (convert_hf.py) or a whole
    `TrainState` (the training examples: optimizers with a schedule or a constant rate).

    `checkpoint.restore` wants the stored tree exactly, so the known layouts are tried in
    turn; a layout mismatch is detected from the tree metadata, before any array is read.
    With `step=None` the newest readable step is used (`checkpoint.restore` skips a
    corrupt newest step with a warning).
    """
    abstract = r1jax.abstract_params(cfg)
    targets = [{"params": abstract}]
    for lr in (lambda count: 0.0, 0.0):  # scheduled (pretrain_tiny, sft) or constant (r1_zero)
        for clip in (1.0, None):
            targets.append(_abstract_train_state(abstract, lr, clip))
    errors = []
    for target in targets:
        try:
            state, _ = ckpt.restore(handle, target, step=step)
        except ckpt.CheckpointMismatchError as err:
            errors.append(err)
            continue
        return state["params"] if isinstance(state, dict) else state.params

    def more(err):  # the layout closest to the checkpoint explains the problem best
        m = re.search(r"\((\d+) more difference", str(err))
        return int(m.group(1)) if m else 0

    closest = min(errors, key=more)
    raise ckpt.CheckpointMismatchError(
        f"the checkpoint does not hold parameters of the expected model ({cfg.model_type}, "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}); if it stores no config, check "
        f"--toy-model. Closest layout: {closest}")


def load_checkpoint(path, *, step: Optional[int] = None, toy_model: Optional[str] = "moe") -> Model:
    """A model saved by one of the examples (see the module docstring)."""
    root, directory = checkpoint_dirs(path)
    handle = ckpt.open_checkpoints(directory, read_only=True)
    try:
        steps = ckpt.all_steps(handle)
        if not steps:
            ckpt.restore(handle, None)  # raises CheckpointNotFoundError with the reason
        if step is not None and step not in steps:
            raise ckpt.CheckpointNotFoundError(
                f"no step {step} in {directory}; committed steps: {steps}")
        meta, errors = None, []
        for candidate in ([step] if step is not None else reversed(steps)):
            try:
                meta = read_metadata(handle, candidate)
                break
            except ckpt.CheckpointCorruptError as err:
                errors.append(str(err))
        if meta is None:
            raise ckpt.CheckpointCorruptError("\n".join(errors))
        tokenizer_dir = root if (root / "tokenizer.json").is_file() else None
        tokenizer = HFTokenizer.from_file(root) if tokenizer_dir else CharTokenizer()
        cfg = config_from_metadata(meta, toy_model, tokenizer.vocab_size, directory)
        params = restore_params(handle, cfg, step)
    finally:
        ckpt.close(handle)
    shown = step if step is not None else steps[-1]
    return Model(cfg, params, tokenizer, f"checkpoint {directory} step {shown}", step,
                 tokenizer_dir)


def copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Puts tokenizer.json (+ tokenizer_config.json) next to a checkpoint, for load_checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (pathlib.Path(src) / name).is_file():
            (dst / name).write_bytes((pathlib.Path(src) / name).read_bytes())


def model_metadata(cfg: r1jax.ModelConfig) -> dict:
    """What the examples store in checkpoint metadata so the model can be rebuilt."""
    return {"model_config": r1jax.configs.to_hf_config(cfg)}


# Prompts ---------------------------------------------------------------------------------------

def apply_template(name: str, text: str) -> str:
    if name == "none":
        return text
    if name == "short":
        return templates.short_prompt(text)
    if name == "r1_zero":
        return templates.r1_zero_prompt(text)
    if name == "chat":
        return templates.render_chat([{"role": "user", "content": text}],
                                     add_generation_prompt=True)
    raise ValueError(f"unknown template {name!r}")


def read_prompts(path) -> list[str]:
    """One prompt per line; a .jsonl file holds objects with a 'prompt' (or 'question') field."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); expected an object "
                             "with a string field 'prompt' or 'question'") from None
        text = record.get("prompt", record.get("question")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: expected an object with a string field 'prompt' or "
                             f"'question', got {line[:80]!r}")
        prompts.append(text)
    return prompts


# The run ---------------------------------------------------------------------------------------

def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    model = load_model(args, seed=args.seed)
    tokenizer = model.tokenizer
    prompts = list(args.prompts) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise SystemExit("no prompts: give them as arguments or with --prompts-file")
    texts = [apply_template(args.template, p) for p in prompts]
    tokens, lengths = tokenize_prompts(tokenizer, texts, add_bos=args.add_bos)
    stop = tuple(sorted({*model.cfg.eos_token_id, tokenizer.eos_id} - {None}))
    scfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, stop_token_ids=stop,
                          speculative=args.speculative, pad_id=tokenizer.pad_id,
                          samples_per_prompt=args.num_samples)
    print(f"model: {model.source}; {r1jax.param_count(model.cfg):,} parameters")
    out = sample(model.params, model.cfg, tokens, lengths, jax.random.key(args.seed), scfg)
    out_tokens, out_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    logprobs, reasons = np.asarray(out.logprobs), np.asarray(out.finish_reason)

    results = []
    for i in range(len(out_tokens)):
        n = int(out_lengths[i])
        result = {"prompt": texts[i // args.num_samples], "sample": i % args.num_samples,
                  "completion": tokenizer.decode(out_tokens[i, :n]), "num_tokens": n,
                  "logprob": float(logprobs[i, :n].sum()),
                  "mean_logprob": float(logprobs[i, :n].mean()) if n else 0.0,
                  "stop_reason": "stop token" if reasons[i] == FINISHED_STOP else "max_new_tokens"}
        if args.show_tokens:
            result["token_logprobs"] = [float(x) for x in logprobs[i, :n]]
        results.append(result)
        print(f"\n[{i // args.num_samples}.{i % args.num_samples}] {result['prompt']!r}\n"
              f"  -> {result['completion']!r}\n"
              f"  {n} tokens, log-prob {result['logprob']:.3f} "
              f"(mean {result['mean_logprob']:.3f}), stopped by {result['stop_reason']}")
        if args.show_tokens:
            print("  " + " ".join(f"{tokenizer.decode([t])!r}:{lp:.2f}"
                                  for t, lp in zip(out_tokens[i, :n], logprobs[i, :n])))
    if args.speculative:
        print(f"\nMTP drafts accepted: {out.acceptance_rate:.1%}")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        print(f"wrote {args.out}")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    g = p.add_argument_group("prompts")
    g.add_argument("prompts", nargs="*", help="prompt texts")
    g.add_argument("--prompts-file", default=None,
                   help="one prompt per line, or .jsonl with 'prompt'")
    g.add_argument("--template", default="none", choices=["none", "short", "r1_zero", "chat"],
                   help="wrap each prompt: short = '{q} <think>' (toy models), r1_zero = the "
                        "paper's Table 1, chat = ChatML user turn")
    g.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's bos token")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.6, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--show-tokens", action="store_true", help="print each token with its log-prob")
    g.add_argument("--out", default=None, help="also write the results as JSONL")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
