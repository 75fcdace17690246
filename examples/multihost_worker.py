"""A few GRPO steps on a mesh that spans several processes (JAX's multi-controller runtime).

Two processes on one machine, two simulated CPU devices each (Gloo collectives):

    export XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu
    python examples/multihost_worker.py --coordinator localhost:12355 --num-processes 2 \\
        --process-id 0 --mesh data=2,fsdp=2 --out /tmp/mh/p0.json --checkpoint-dir /tmp/mh/ckpt &
    python examples/multihost_worker.py --coordinator localhost:12355 --num-processes 2 \\
        --process-id 1 --mesh data=2,fsdp=2 --out /tmp/mh/p1.json --checkpoint-dir /tmp/mh/ckpt

On real hosts, give each the same --coordinator (process 0's address) and its own
--process-id. Every process runs the same program (SPMD):

1. `jax.distributed.initialize` (`workdir.init_hosts`); the mesh spans all processes' devices;
2. `init_params(key, cfg, mesh=...)`: each process creates only its shards;
3. every process knows the global batch's shape but loads only its own rows
   (`sharding.process_rows`) and hands them over with `sharding.global_batch`
   (`jax.make_array_from_process_local_data`);
4. GRPO steps; the loss is a replicated value, identical on every process;
5. a checkpoint is written by all processes together (orbax), restored into the same
   shardings, and the run resumes from it: the resumed step's loss equals the uninterrupted one.

The batch is a hand-built `RolloutBatch` (random tokens, masks and advantages): this
script is about the multi-process mechanics, not about rewards.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import workdir as wd  # noqa: E402

import r1jax  # noqa: E402
from r1jax import checkpoint as ckpt  # noqa: E402
from r1jax import sharding as shd  # noqa: E402
from r1jax import training  # noqa: E402
from r1jax.rl import grpo  # noqa: E402
from r1jax.rl.rollout import RolloutBatch  # noqa: E402
from r1jax.rl.train import make_train_step  # noqa: E402

ROWS, SEQ = 8, 16  # GRPO rows (4 prompts x G = 2), tokens per row
# beta > 0 with a fixed reference: with mu = 1 the surrogate's value is -mean(advantage)
# whatever the parameters (ratio 1); the KL term makes the loss depend on them.
GCFG = grpo.GRPOConfig(num_generations=2, beta=0.04, num_iterations=1, max_completion_length=10)


def host_batch(cfg, seed: int) -> dict:
    """The whole global batch as numpy (every process can build it; each keeps its rows)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 10, ROWS)
    pos = np.arange(1, SEQ)[None]
    rewards = rng.random((ROWS // 2, 2)).astype(np.float32)
    advantages = grpo.group_advantages(jnp.asarray(rewards), True)
    return dict(tokens=rng.integers(2, cfg.vocab_size, (ROWS, SEQ)).astype(np.int32),
                mask=((pos >= 5) & (pos < 5 + lengths[:, None])).astype(np.float32),
                advantages=np.asarray(advantages).reshape(-1),
                rewards=rewards.reshape(-1), lengths=lengths.astype(np.int32),
                truncated=np.zeros(ROWS, bool),
                ref_logp=(np.log(1 / cfg.vocab_size) + 0.5 * rng.standard_normal((ROWS, SEQ - 1))
                          ).astype(np.float32))


def replicated_value(x) -> float:
    """A fully replicated (global) scalar as a float, on any process."""
    return float(np.asarray(x.addressable_data(0)))


def run(mesh_spec: str, steps: int, devices=None, checkpoint_dir=None) -> dict:
    cfg = r1jax.configs.tiny_dense()
    mesh = r1jax.make_mesh(mesh_spec, devices)
    mesh_rules = r1jax.MeshRules(mesh)
    optimizer = training.make_optimizer(1e-3, eps=1e-3)
    params = r1jax.init_params(jax.random.key(0), cfg, mesh=mesh)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    shardings = training.state_shardings(optimizer, abstract_opt, param_shardings, mesh_rules)
    state = training.init_train_state(params, optimizer, jax.random.key(1))
    step = make_train_step(cfg, GCFG, optimizer, mesh_rules=mesh_rules, state_shardings=shardings)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                                     for x in jax.tree.leaves(p)))

    rows = shd.process_rows(mesh_rules, ROWS)
    losses, out = [], {"process_rows": [rows.start, rows.stop], "devices": jax.device_count(),
                       "local_devices": jax.local_device_count()}
    batches = []
    for i in range(steps):
        local = {k: v[rows] for k, v in host_batch(cfg, seed=i).items()}
        batches.append(RolloutBatch(**shd.global_batch(local, mesh_rules, ROWS)))
    handle = ckpt.open_checkpoints(checkpoint_dir, max_to_keep=2) if checkpoint_dir else None
    for i, batch in enumerate(batches):
        if handle is not None and i == steps - 1:  # save before the last step, resume below
            ckpt.save(handle, i, state, {"next_step": i}, force=True)
            ckpt.wait(handle)
            out["checksum_saved"] = replicated_value(checksum(state.params))
        state, metrics = step(state, batch)
        losses.append(replicated_value(metrics["loss"]))
        out.setdefault("grad_norms", []).append(replicated_value(metrics["grad_norm"]))
    out["losses"] = losses
    out["checksum_final"] = replicated_value(checksum(state.params))
    if handle is not None:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                              state)
        restored, meta = ckpt.restore(handle, target)
        ckpt.close(handle)
        out["checksum_restored"] = replicated_value(checksum(restored.params))
        out["restored_step"] = int(replicated_value(restored.step))
        restored, metrics = step(restored, batches[meta["next_step"]])
        out["resumed_loss"] = replicated_value(metrics["loss"])
        out["resumed_checksum"] = replicated_value(checksum(restored.params))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    wd.add_host_flags(parser)
    parser.add_argument("--mesh", default="data=2,fsdp=2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    wd.init_hosts(args)
    out = run(args.mesh, args.steps, checkpoint_dir=args.checkpoint_dir)
    out["process_index"] = jax.process_index()
    out["process_count"] = jax.process_count()
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
