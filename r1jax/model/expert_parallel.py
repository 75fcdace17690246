"""Expert parallelism for the routed experts of a DeepSeekMoE layer (`jax.shard_map`).

The routed experts are split over the mesh axes that the rules give the logical axis
`experts` (the presets: mesh axis `expert`); each device holds E / ep whole experts. The
router and the shared experts stay outside, in the sharded-jit world; only the routed
experts run inside `shard_map`, where the collective pattern is the point:

1. all-gather the tokens over the expert axis: every device of an expert group sees the
   group's ep * n tokens (x [n, d], the chosen expert ids [n, k] and gate weights [n, k]);
2. each device runs the local grouped matmul (`moe.expert_ffn_blocks`, or on GPU
   `moe.expert_ffn_grouped`: see `moe.resolve_moe_matmul`) on the pairs routed
   to *its* experts, one source device's n tokens at a time (a `lax.map` over the ep
   chunks): pairs owned elsewhere get an out-of-range id, which the block dispatch skips
   (no compute), and each token's outputs are summed over its local experts with the gate
   weights;
3. reduce-scatter (`psum_scatter`) over the expert axis returns to each device the sum
   over all experts of its own tokens. With `expert_mlp` on `tensor` (default rules),
   each device holds a slice of its experts' hidden width, and the partial outputs are
   also summed over `tensor`. When the rules do not split the batch over the expert axis,
   the tokens are already the same on the whole expert group: no gather, a plain psum.

Why all-gather + reduce-scatter rather than all-to-all: dropless with static shapes means
every buffer is sized for the worst case. A padded all-to-all of (token, expert) pairs
must size every per-peer block for all n * k local pairs, so it sends ep * n * k rows;
here a token crosses to each peer once, however many of that peer's experts it chose:
ep * n rows, k times fewer (for DeepSeek-V3, k = 8 on ep = 8, that is the volume an
exact pair all-to-all would send). `jax.lax.ragged_all_to_all` (exact traffic, dynamic
sizes) is not implemented by XLA:CPU ("UNIMPLEMENTED: HLO opcode ragged-all-to-all"), so
it could not be tested here; it is the natural next step for GPU/TPU runs.

Memory per device while one MoE layer runs (n = local tokens, k = experts per token,
d = width, E_local = experts per device, f_local = expert hidden width / tensor):
  gathered tokens and summed outputs      2 * ep * n * d
  one chunk's sorted, block-padded rows   ~3 * (n * k + E_local * block) * d
  one chunk's gate/up products            2 * (n * k + E_local * block) * f_local
i.e. ep * n * d for the exchange plus what the single-device path needs for n tokens.
Those chunk buffers are sized for the worst case of the chunk (all n * k pairs routed
to this device); the compute runs only occupied blocks, about n * k / ep rows per chunk
when the load is balanced. With `ModelConfig.remat` (what large models use) the backward
pass keeps each chunk's inputs and recomputes its forward (one more expert forward), so
the block buffers exist for one chunk at a time; without it, every chunk's buffers are
kept for the backward pass (ep times the above). `python -m r1jax.plan` reports what the
compiler allocates.

The result equals the single-device `moe` up to float summation order.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from r1jax.configs import ModelConfig
from r1jax.model import moe as moe_lib
from r1jax.sharding import MeshRules


def _axes(mesh_rules: MeshRules, logical: str) -> tuple[str, ...]:
    axes = mesh_rules.rules.mesh_axes(logical)
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _size(mesh_rules: MeshRules, axes: tuple[str, ...]) -> int:
    return math.prod(mesh_rules.mesh.shape[a] for a in axes)


def expert_axes(mesh_rules: Optional[MeshRules]) -> tuple[str, ...]:
    """The mesh axes that split the routed experts (empty without a mesh)."""
    return () if mesh_rules is None else _axes(mesh_rules, "experts")


def enabled(cfg: ModelConfig, mesh_rules: Optional[MeshRules]) -> bool:
    """True when the routed experts are split over mesh axes of total size > 1."""
    if mesh_rules is None or not cfg.n_routed_experts:
        return False
    axes = expert_axes(mesh_rules)
    ep = _size(mesh_rules, axes)
    if ep > 1 and cfg.n_routed_experts % ep:
        where = f"mesh axis {axes[0]}" if len(axes) == 1 else f"mesh axes {' x '.join(axes)}"
        raise ValueError(f"expert parallelism: n_routed_experts={cfg.n_routed_experts} is not "
                         f"divisible by {where} of size {ep}")
    return ep > 1


def routed_experts(x_nd: jax.Array, experts_nk: jax.Array, weights_nk: jax.Array,
                   w: moe_lib.MoEWeights, cfg: ModelConfig, mesh_rules: MeshRules) -> jax.Array:
    """sum_k weights[n, k] * expert_{experts[n, k]}(x[n]) -> [n, d], experts split over devices.

    Rows are the tokens (laid out over the rules' `batch` axes); any n works (rows are
    padded to a multiple of the batch shards and the padding routed nowhere).
    """
    mesh = mesh_rules.mesh
    ep_axes = expert_axes(mesh_rules)
    batch_axes = _axes(mesh_rules, "batch")
    gather_axes = tuple(a for a in ep_axes if a in batch_axes)  # tokens differ along these
    copy_axes = tuple(a for a in ep_axes if a not in batch_axes)  # tokens replicated along these
    f = cfg.moe_intermediate_size
    mlp_axes = tuple(a for a in _axes(mesh_rules, "expert_mlp") if a not in batch_axes)
    if f % _size(mesh_rules, mlp_axes):
        mlp_axes = ()  # the weights' own sharding check reports this; here: gather instead
    e_local = cfg.n_routed_experts // _size(mesh_rules, ep_axes)
    k = cfg.num_experts_per_tok
    shards = _size(mesh_rules, batch_axes)

    n = x_nd.shape[0]
    pad = -n % shards
    if pad:  # padding rows choose no expert (-1) and carry zero weight
        x_nd = jnp.pad(x_nd, ((0, pad), (0, 0)))
        experts_nk = jnp.pad(experts_nk, ((0, pad), (0, 0)), constant_values=-1)
        weights_nk = jnp.pad(weights_nk, ((0, pad), (0, 0)))
    n_local = (n + pad) // shards
    chunks = _size(mesh_rules, gather_axes)
    # rows per local expert in one chunk, on average: n_local * k / E
    block = cfg.moe_block_size or moe_lib.block_size(n_local * k // chunks, e_local)
    grouped_rows = cfg.moe_block_size or moe_lib.GROUPED_BLOCK_ROWS
    dispatch, impl = moe_lib.resolve_moe_matmul(cfg, grouped_rows, f // _size(mesh_rules, mlp_axes))

    def local(x, experts, weights, gate, up, down):
        if gather_axes:
            x, experts, weights = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True)
                                   for a in (x, experts, weights))
        index = 0  # this device's position along the expert axes (row-major, as sharded)
        for axis in ep_axes:
            index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
        ids = experts - index * e_local
        ids = jnp.where((ids >= 0) & (ids < e_local), ids, e_local)  # elsewhere: skipped

        def chunk(args):  # the tokens of one source device
            if dispatch == "grouped":
                return moe_lib.expert_ffn_grouped(*args, gate, up, down, grouped_rows, impl)[0]
            return moe_lib.expert_ffn_blocks(*args, gate, up, down, block)[0]

        if cfg.remat:  # the backward pass keeps each chunk's inputs and recomputes from
            chunk = jax.checkpoint(chunk)  # there: block buffers for one chunk at a time
        y = jax.lax.map(chunk, tuple(a.reshape(chunks, n_local, *a.shape[1:])
                                     for a in (x, ids, weights)))
        y = y.reshape(chunks * n_local, -1)
        if gather_axes:
            y = jax.lax.psum_scatter(y, gather_axes, scatter_dimension=0, tiled=True)
        if copy_axes + mlp_axes:
            y = jax.lax.psum(y, copy_axes + mlp_axes)
        return y

    rows = PartitionSpec(batch_axes or None, None)
    ep = ep_axes if len(ep_axes) > 1 else ep_axes[0]
    mlp = (mlp_axes if len(mlp_axes) > 1 else mlp_axes[0]) if mlp_axes else None
    y = jax.shard_map(
        local, mesh=mesh,
        in_specs=(rows, rows, rows, PartitionSpec(ep, None, mlp), PartitionSpec(ep, None, mlp),
                  PartitionSpec(ep, mlp, None)),
        out_specs=rows, check_vma=False,
    )(x_nd, experts_nk, weights_nk.astype(jnp.float32), w.gate, w.up, w.down)
    return y[:n] if pad else y
