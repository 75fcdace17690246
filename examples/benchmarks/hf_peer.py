"""The Hugging Face side of a benchmark, run in its own process (no JAX imported here).

Why a separate process: once XLA has run work in a process, PyTorch's CPU kernels in that
same process slow down about 10-25x on this 2-core machine (a Qwen2 decode step: 20 ms
before any JAX work, 520 ms after it), while a child process of an idle JAX parent runs at
full speed. Benchmarks therefore write their inputs to a folder and call

    python examples/benchmarks/hf_peer.py --model-dir DIR --inputs DIR/inputs.npz \
        --new-tokens 128 --repeats 3 --threads 2 --out DIR/hf.json

`inputs.npz` holds `check_tokens` [b, t] and `check_logits` [b, t, v] (the logits r1jax
computed for them: the weights-are-identical check) and `prompt_<batch>` [batch, P] int32
prompts to generate from. The JSON written holds the max abs logits difference and, per
batch size, the median and all wall times of `generate()`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from peak_rss import add_retain_flag, keep_freed_heap_memory


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="a folder written by r1jax.save_hf")
    p.add_argument("--inputs", required=True, help="npz with check_tokens, check_logits, prompt_<b>")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="JSON result path")
    add_retain_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    retained = keep_freed_heap_memory() if args.retain_freed_memory else False
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = np.load(args.inputs)
    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "class": type(model).__name__,
              "retained_freed_memory": retained, "runs": {}}

    with torch.no_grad():
        theirs = model(torch.from_numpy(inputs["check_tokens"]).long()).logits.float().numpy()
    result["logits_max_abs_diff"] = float(np.max(np.abs(theirs - inputs["check_logits"])))

    def generate(ids, n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                 min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        if out.shape[1] != ids.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {n}")

    for name in sorted(k for k in inputs.files if k.startswith("prompt_")):
        ids = torch.from_numpy(inputs[name]).long()
        generate(ids, min(4, args.new_tokens))  # warm-up: allocations, kernel choice
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(ids, args.new_tokens)
            times.append(time.perf_counter() - start)
        batch = int(name.split("_", 1)[1])
        result["runs"][str(batch)] = {"median_s": statistics.median(times), "times_s": times}
        print(f"  HF batch {batch}: {batch * args.new_tokens / statistics.median(times):.1f} tok/s",
              flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
