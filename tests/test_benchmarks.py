"""The benchmark scripts keep running (tiny sizes, no peer): they are not timed here."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sampling_benchmark_quick(tmp_path):
    out = tmp_path / "sampling.json"
    subprocess.run([sys.executable, str(ROOT / "examples/benchmarks/sampling.py"), "--quick",
                    "--skip-peer", "--out", str(out)], check=True, timeout=600, cwd=ROOT,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"deepseek", "qwen2"}
    deepseek = result["models"]["deepseek"]
    # MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer (float32 bytes)
    assert deepseek["cache_bytes_per_token"]["per_layer"] == (16 + 8) * 4
    assert result["limits"]["matmul_gflops"] > 0
