"""Memory planner: does a training step of this model fit on this mesh?

    python -m r1jax.plan --model deepseek_v3_671b --mesh fsdp=32,expert=8 \\
        --batch 256 --seq 4096 --device-memory-gb 80

compiles the language-model train step (`training.make_lm_train_step` with AdamW,
`training.make_optimizer`) ahead of time against abstract inputs -- `jax.ShapeDtypeStruct`s
carrying the rules' shardings, so no weight is ever allocated -- and reports per device:

  parameters, optimizer state, gradients   from the weight declarations and their shardings
  batch                                    tokens + mask, split over the batch axes
  compiler: arguments / outputs / temps    `compiled.memory_analysis()`
  peak                                     arguments + outputs - donated (aliased) + temps

The gradients and the activations live inside the compiler's temporaries; "activations
and workspace" is temps minus gradients (an estimate: the split is not reported by XLA).

How it compiles without the hardware: JAX 0.10 cannot build a compile-only topology for
GPUs or CPUs here (`jax.experimental.topologies.get_topology_desc` implements TPU only), so
the step is compiled by XLA:CPU for N simulated host devices
(`--xla_force_host_platform_device_count=N`, in a subprocess when the current process
has another device count). The SPMD partitioning, hence the per-device shapes, is the one a
GPU run would get; fusion and buffer assignment are the CPU compiler's, so treat temps as
an estimate (XLA:CPU may also upcast bfloat16 matmuls to float32). Beyond
`MAX_SIMULATED_DEVICES` devices (or when compiling fails) the planner falls back to the
analytic numbers only and says so. Models over a billion parameters are planned with
`remat=True` unless `--remat off`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional

MAX_SIMULATED_DEVICES = 2048
GB = 1e9


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one LM train step (see the module docstring)."""

    model: str
    mesh: str
    rules: str
    batch: int
    seq: int
    devices: int
    remat: bool
    params: int
    param_count: int
    opt_state: int
    grads: int
    batch_bytes: int
    device_memory: int
    method: str  # 'compiled (XLA:CPU, N simulated devices)' or 'analytic'
    arguments: Optional[int] = None
    outputs: Optional[int] = None
    aliased: Optional[int] = None
    temps: Optional[int] = None
    compile_seconds: Optional[float] = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def activations(self) -> Optional[int]:
        """Compiler temporaries minus gradients: activations kept for the backward pass
        and the working buffers of the layer being computed."""
        return None if self.temps is None else max(self.temps - self.grads, 0)

    @property
    def peak(self) -> int:
        if self.temps is None:  # analytic: state + gradients + batch, activations unknown
            return self.params + self.opt_state + self.grads + self.batch_bytes
        return self.arguments + self.outputs - self.aliased + self.temps

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory


# Abstract inputs -----------------------------------------------------------------------------

def _bytes_per_device(tree) -> int:
    import jax
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               if x.sharding is not None else x.size * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def abstract_step_inputs(cfg, mesh_rules, optimizer, batch: int, seq: int):
    """(TrainState, tokens, mask) as sharded `jax.ShapeDtypeStruct`s, and the state's shardings."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from r1jax import sharding as shd
    from r1jax import training
    from r1jax.model import transformer

    params = shd.abstract(transformer.param_infos(cfg), mesh_rules)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    shardings = training.state_shardings(optimizer, opt_state, param_shardings, mesh_rules)
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = training.TrainState(params=params, opt_state=opt_state,
                                step=jax.ShapeDtypeStruct((), jnp.int32), key=key)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    rows = mesh_rules.rules.spec(("batch", None))
    shd.check_divisible("batch", (batch, seq), rows, mesh_rules.mesh)
    rows = NamedSharding(mesh_rules.mesh, rows)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=rows)
    return state, tokens, mask, shardings


# Planning ------------------------------------------------------------------------------------

def _config(model: str, remat: Optional[bool]):
    from r1jax import configs
    from r1jax.model import transformer
    cfg = configs.preset(model)
    count = transformer.param_count(cfg, with_mtp=True)
    if remat is None:
        remat = count > 1e9
    # the accelerator's program: layers under lax.scan (XLA:CPU compiles the plan, and
    # `forward` would otherwise unroll them as it does for CPU runs)
    return cfg.replace(remat=remat, unroll_layers=False), count


def _default_batch(mesh_spec: str, rules: str) -> int:
    from r1jax import sharding as shd
    sizes = shd.parse_mesh_spec(mesh_spec)
    axes = shd.RULE_PRESETS[rules]().mesh_axes("batch")
    return math.prod(sizes[a] for a in shd._as_tuple(axes))


def plan_here(model: str, mesh_spec: str, rules: str = "fsdp_tp_ep", batch: Optional[int] = None,
              seq: int = 4096, device_memory_gb: float = 80.0, remat: Optional[bool] = None,
              compile: bool = True) -> MemoryPlan:
    """Plans in this process, on its devices (their count must be the mesh's)."""
    import jax

    from r1jax import sharding as shd
    from r1jax import training

    cfg, count = _config(model, remat)
    batch = batch or _default_batch(mesh_spec, rules)
    sizes = shd.parse_mesh_spec(mesh_spec)
    devices = math.prod(sizes.values())
    if compile:
        mesh = shd.make_mesh(sizes)
    else:  # shardings only: an abstract mesh needs no devices
        mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in shd.MESH_AXES), shd.MESH_AXES)
    mesh_rules = shd.MeshRules(mesh, shd.RULE_PRESETS[rules]())
    optimizer = training.make_optimizer(1e-4, weight_decay=0.1)
    state, tokens, mask, shardings = abstract_step_inputs(cfg, mesh_rules, optimizer, batch, seq)
    params = _bytes_per_device(state.params)
    result = MemoryPlan(
        model=model, mesh=mesh_spec, rules=rules, batch=batch, seq=seq, devices=devices,
        remat=cfg.remat, params=params, param_count=count,
        opt_state=_bytes_per_device(state.opt_state), grads=params,
        batch_bytes=_bytes_per_device((tokens, mask)),
        device_memory=int(device_memory_gb * GB), method="analytic")
    if not compile:
        result.notes.append("not compiled: activations and compiler temporaries unknown")
        return result
    step = training.make_lm_train_step(cfg, optimizer, mesh_rules=mesh_rules,
                                       state_shardings=shardings)
    start = time.perf_counter()
    compiled = step.lower(state, tokens, mask).compile()
    result.compile_seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    result.arguments = int(stats.argument_size_in_bytes)
    result.outputs = int(stats.output_size_in_bytes)
    result.aliased = int(stats.alias_size_in_bytes)
    result.temps = int(stats.temp_size_in_bytes)
    platform = jax.devices()[0].platform
    result.method = f"compiled (XLA:{platform.upper()}, {devices} devices)"
    if platform == "cpu":
        result.notes.append("compiled by XLA:CPU on simulated devices: per-device shapes are the "
                            "SPMD partitioner's, temporaries are the CPU compiler's estimate")
    return result


def plan(model: str, mesh_spec: str, rules: str = "fsdp_tp_ep", batch: Optional[int] = None,
         seq: int = 4096, device_memory_gb: float = 80.0, remat: Optional[bool] = None,
         timeout: float = 1800) -> MemoryPlan:
    """Plans one LM train step. Compiles in this process when it has exactly the mesh's
    device count, else in a subprocess with that many simulated CPU devices; falls back to
    the analytic numbers beyond `MAX_SIMULATED_DEVICES` or when compiling fails."""
    import jax

    from r1jax import sharding as shd

    devices = math.prod(shd.parse_mesh_spec(mesh_spec).values())
    kwargs = dict(rules=rules, batch=batch, seq=seq, device_memory_gb=device_memory_gb, remat=remat)
    if jax.device_count() == devices:
        return plan_here(model, mesh_spec, **kwargs)
    if devices > MAX_SIMULATED_DEVICES:
        result = plan_here(model, mesh_spec, compile=False, **kwargs)
        result.notes.append(f"{devices} devices > {MAX_SIMULATED_DEVICES} simulated: not compiled")
        return result
    try:
        return _plan_subprocess(model, mesh_spec, devices, timeout=timeout, **kwargs)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        result = plan_here(model, mesh_spec, compile=False, **kwargs)
        result.notes.append(f"compiling on {devices} simulated devices failed: {err}")
        return result


def _plan_subprocess(model, mesh_spec, devices, *, rules, batch, seq, device_memory_gb, remat,
                     timeout) -> MemoryPlan:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["R1JAX_PLAN_CHILD"] = "1"
    cmd = [sys.executable, "-m", "r1jax.plan", "--model", model, "--mesh", mesh_spec,
           "--rules", rules, "--seq", str(seq), "--device-memory-gb", str(device_memory_gb),
           "--json"]
    if batch:
        cmd += ["--batch", str(batch)]
    if remat is not None:
        cmd += ["--remat", "on" if remat else "off"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                           else f"exit status {proc.returncode}")
    return MemoryPlan(**json.loads(proc.stdout.strip().splitlines()[-1]))


# Report --------------------------------------------------------------------------------------

def _gb(x: Optional[int]) -> str:
    return "n/a" if x is None else f"{x / GB:.2f}"


def format_table(p: MemoryPlan) -> str:
    rows = [
        ("parameters", p.params, f"{p.param_count / 1e9:.3g}B parameters (with MTP), sharded"),
        ("optimizer state", p.opt_state, "AdamW moments (parameter dtype)"),
        ("gradients", p.grads, "inside the temporaries"),
        ("batch", p.batch_bytes, f"tokens + mask [{p.batch} x {p.seq}]"),
        ("activations + workspace", p.activations, "temporaries - gradients"),
        ("compiler: arguments", p.arguments, "state + batch"),
        ("compiler: outputs", p.outputs, "new state + metrics"),
        ("compiler: aliased", p.aliased, "donated state, counted once"),
        ("compiler: temporaries", p.temps, ""),
        ("peak", p.peak, "arguments + outputs - aliased + temporaries"
         if p.temps is not None else "state + gradients + batch only"),
    ]
    width = max(len(r[0]) for r in rows)
    head = (f"{p.model} on {p.devices} devices ({p.mesh}), rules {p.rules}, batch {p.batch} x "
            f"seq {p.seq}, remat={'on' if p.remat else 'off'}; {p.method}"
            + (f", compiled in {p.compile_seconds:.0f} s" if p.compile_seconds else ""))
    lines = [head, f"{'per device':<{width}}  {'GB':>8}", "-" * (width + 10)]
    lines += [f"{name:<{width}}  {_gb(value):>8}  {note}" for name, value, note in rows]
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"{'device memory':<{width}}  {_gb(p.device_memory):>8}  {verdict}"
                 f" ({p.peak / p.device_memory:.0%} used)")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    from r1jax import configs, sharding as shd

    parser = argparse.ArgumentParser(prog="python -m r1jax.plan",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(configs.PRESETS))
    parser.add_argument("--mesh", required=True, help='e.g. "fsdp=32,expert=8"')
    parser.add_argument("--rules", default="fsdp_tp_ep", choices=sorted(shd.RULE_PRESETS))
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (sequences); default: one per batch shard")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--device-memory-gb", type=float, default=80.0)
    parser.add_argument("--remat", choices=("auto", "on", "off"), default="auto",
                        help="auto: on for models over 1B parameters")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    args = parser.parse_args(argv)
    remat = {"auto": None, "on": True, "off": False}[args.remat]
    kwargs = dict(rules=args.rules, batch=args.batch, seq=args.seq,
                  device_memory_gb=args.device_memory_gb, remat=remat)
    if os.environ.get("R1JAX_PLAN_CHILD"):
        result = plan_here(args.model, args.mesh, **kwargs)
    else:
        result = plan(args.model, args.mesh, **kwargs)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
