"""The memory planner (`python -m r1jax.plan`): its parameter and optimizer-state bytes
against an independent count from the weight declarations, the compiler's argument bytes
against those, the analytic fallback, and the DeepSeek-V3 671B plan on 256 devices."""
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import r1jax
from r1jax import plan as planner
from r1jax import sharding as shd
from r1jax.model import transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared_bytes_per_device(cfg, mesh_spec: str, rules) -> int:
    """Sum over the declarations of size * itemsize / (product of the mesh axes that the
    rules give the weight's dimensions): no shardings, no shard shapes."""
    sizes = shd.parse_mesh_spec(mesh_spec)
    total = 0
    for info in jax.tree.leaves(transformer.param_infos(cfg), is_leaf=shd.is_info):
        spec = rules.spec(info.logical_axes, info.shape, sizes)
        split = math.prod(sizes[a] for part in spec for a in shd._as_tuple(part))
        assert info.size % split == 0
        total += info.size * np.dtype(info.dtype).itemsize // split
    return total


def test_compiled_plan_matches_declarations():
    """tiny_dense on the 8 devices of this process (compiled here, no subprocess)."""
    mesh_spec, rules = "fsdp=4,tensor=2", shd.fsdp_tp_rules()
    p = planner.plan("tiny_dense", mesh_spec, rules="fsdp_tp", batch=8, seq=16)
    cfg = r1jax.configs.tiny_dense()
    assert p.method == "compiled (XLA:CPU, 8 devices)" and p.devices == 8
    assert p.param_count == shd.count(transformer.param_infos(cfg))
    assert p.params == declared_bytes_per_device(cfg, mesh_spec, rules)
    assert p.params < shd.count(transformer.param_infos(cfg)) * 4 / 2  # really split
    assert p.opt_state == 2 * p.params + 4  # Adam's two moments + its int32 step count
    assert p.grads == p.params
    assert p.batch_bytes == 8 * 16 * (4 + 4) // 4  # tokens + mask, rows over fsdp (4)
    # the compiler's arguments: exactly the state (+ step and key) and the batch
    key_bytes = jax.random.key_data(jax.random.key(0)).nbytes
    assert p.arguments == p.params + p.opt_state + 4 + key_bytes + p.batch_bytes
    assert p.aliased == p.params + p.opt_state + 4 + key_bytes  # the donated state
    assert p.temps >= p.grads and p.peak > p.params + p.opt_state and p.fits
    table = planner.format_table(p)
    for row in ("parameters", "optimizer state", "gradients", "activations + workspace",
                "compiler: temporaries", "peak", "device memory"):
        assert row in table


def test_analytic_plan_beyond_simulated_devices():
    """4096 devices are not simulated: declarations only, and the plan says so. The MLA
    latent ranks are FSDP-sharded (fallback rules), so no large weight is replicated."""
    mesh_spec = "fsdp=512,expert=8"
    p = planner.plan("deepseek_v3_671b", mesh_spec)
    cfg = r1jax.configs.deepseek_v3_671b()
    assert p.method == "analytic" and p.temps is None and p.batch == 4096
    assert any("not compiled" in n for n in p.notes)
    assert p.params == declared_bytes_per_device(cfg, mesh_spec, shd.default_rules())
    assert p.param_count == r1jax.param_count(cfg, with_mtp=True)
    assert "n/a" in planner.format_table(p)
    q_b = r1jax.abstract_params(cfg, jax.sharding.AbstractMesh((1, 512, 1, 8), shd.MESH_AXES))
    assert q_b.moe_layers.attn.q_b.sharding.spec[1] == "fsdp"


def test_bad_batch_names_the_axes():
    with pytest.raises(ValueError, match=r"batch: dimension 0 has size 6, not divisible by mesh "
                                         r"axes data x fsdp x expert of size 8"):
        planner.plan_here("tiny_dense", "fsdp=4,expert=2", batch=6, seq=8, compile=False)


@pytest.mark.slow
def test_deepseek_v3_671b_on_256_gpus():
    """`python -m r1jax.plan` compiles the 671B train step for 256 simulated devices (about
    40 s of CPU on 2 cores; the step is a scan over layers, so depth costs no compile time)."""
    out = subprocess.run(
        [sys.executable, "-m", "r1jax.plan", "--model", "deepseek_v3_671b", "--mesh",
         "fsdp=32,expert=8", "--device-memory-gb", "80"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    lines = out.stdout.splitlines()
    assert "compiled (XLA:CPU, 256 devices)" in lines[0] and "remat=on" in lines[0]
    rows = {line[:24].strip(): line[24:].split()[0] for line in lines[3:] if line[:1].isalpha()}
    cfg = r1jax.configs.deepseek_v3_671b()
    expected = declared_bytes_per_device(cfg, "fsdp=32,expert=8", shd.default_rules())
    assert float(rows["parameters"]) == pytest.approx(expected / 1e9, abs=0.006)
    assert float(rows["optimizer state"]) == pytest.approx(2 * expected / 1e9, abs=0.011)
    assert float(rows["compiler: temporaries"]) > 0
    assert "device memory" in out.stdout and "fit" in out.stdout
