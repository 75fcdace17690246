"""The benchmark scripts keep running (tiny sizes, no peer): they are not timed here."""
import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_quick(tmp_path, name: str, *flags: str) -> dict:
    """Runs examples/benchmarks/<name>.py --quick and returns the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks" / f"{name}.py"), "--quick",
                    *flags, "--out", str(out)], check=True, timeout=600, cwd=ROOT,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["limits"]["matmul_gflops"] > 0
    return result


def test_sampling_benchmark_quick(tmp_path):
    result = run_quick(tmp_path, "sampling", "--skip-peer")
    assert set(result["models"]) == {"deepseek", "qwen2"}
    deepseek = result["models"]["deepseek"]
    # MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer (float32 bytes)
    assert deepseek["cache_bytes_per_token"]["per_layer"] == (16 + 8) * 4


def test_grpo_step_benchmark_quick(tmp_path):
    result = run_quick(tmp_path, "grpo_step", "--skip-peer")
    assert result["peer"] == "--skip-peer" and result["trl"] is None
    ours = result["r1jax"]
    for phase in ("step_s", "generate_s", "reference_s", "update_s"):
        assert ours["median"][phase] > 0 and result["floor_s"][phase] > 0
        assert 0 < ours["limit_fraction"][phase]
    assert ours["peak_rss_bytes"] > 0
    # 2 prompts x G = 4 rows of 8 + 8 tokens; update = forward + backward = 3 forwards
    assert result["flops"]["tokens"] == 8 * 16
    assert result["flops"]["update"] == 3 * result["flops"]["reference"]


def test_train_step_benchmark_quick(tmp_path):
    result = run_quick(tmp_path, "train_step")
    assert set(result["models"]) == {"deepseek", "qwen2"}
    for row in result["models"].values():
        assert row["median_s"] > 0 and row["fraction_of_peak"] > 0
        assert row["flops"] > 6 * row["active_params_per_token"] * row["batch"] * row["seq_len"] > 0
    moe = result["moe_layer"]
    # tiny_moe: top-2 of 8 experts + 1 shared expert of 32 -> dense SwiGLU of 96
    assert moe["dense_hidden"] == (2 + 1) * 32
    assert moe["ratio"] == moe["moe"]["median_s"] / moe["dense"]["median_s"] > 0


def test_gpu_benchmark_smoke(tmp_path):
    """gpu.py measures only on a GPU; --smoke runs its code paths here (kernels
    interpreted, tiny sizes) so that a scarce GPU session does not find a broken script."""
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks/gpu.py"), "--smoke",
                    "--sections", "limits,moe,decode,grpo", "--models", "qwen2", "--out", str(out)],
                   check=True, timeout=600, cwd=ROOT, capture_output=True, text=True)
    result = json.loads(out.read_text())
    moe = result["moe"]["tiny"]
    for dispatch in ("blocks", "grouped_xla", "grouped_pallas", "ragged_dot"):
        assert moe[dispatch]["median_s"] > 0, moe[dispatch]
    assert result["moe"]["tiny_whole_layer"]["ratio"] > 0
    assert result["decode"]["tiny_dense"]["new_tokens_per_s"] > 0
    grpo = result["grpo"]["tiny_dense"]
    parity = grpo["logprobs_shared_vs_rows_float32"]
    assert parity["tokens"] == 2 * 4 * 8 and parity["max_abs_diff"] < 1e-4 < parity["max_abs_logprob"]
    for run in ("shared_prompts", "whole_rows"):
        assert grpo[run]["median"]["step_s"] > 0 and math.isfinite(grpo[run]["warmup"]["grad_norm"])
