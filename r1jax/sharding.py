"""Meshes, logical-axis sharding rules, and weight declarations.

Only this file names mesh axes (`data, fsdp, tensor, expert`). Everything else names
*logical* axes (`batch, embed, heads, experts, ...`); a `ShardingRules` value maps
them to mesh axes. Each weight is declared once as an `ArrayInfo`; the abstract tree,
the shardings, the random init and the parameter count all come from those
declarations.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES = ("batch", "seq", "embed", "act_embed", "heads", "kv_heads", "head_dim", "q_lora",
                "kv_lora", "mlp", "experts", "expert_mlp", "vocab", "layers", "cache_seq")

MeshAxes = Union[None, str, tuple[str, ...]]
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]  # e.g. an `Init`


# Meshes --------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'fsdp=4,expert=2' -> {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 2}."""
    sizes = {axis: 1 for axis in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} needs an integer size, got {value!r}")
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; expected >= 1")
        sizes[name] = size
    return sizes


def make_mesh(spec: Union[str, dict[str, int]] = "", devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) from a spec such as "fsdp=4,expert=2".

    Axes left out have size 1. An empty spec puts every device on `fsdp`. The product of
    the sizes must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else {a: 1 for a in MESH_AXES} | dict(spec)
    if isinstance(spec, str) and not spec.strip():
        sizes["fsdp"] = len(devices)
    total = math.prod(sizes.values())
    if total != len(devices):
        detail = ", ".join(f"{a}={s}" for a, s in sizes.items() if s > 1) or "all axes 1"
        raise ValueError(f"mesh {detail} needs {total} devices, but {len(devices)} are present; "
                         "make the product of the axis sizes equal the device count")
    grid = np.array(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


# Rules ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps logical axis names to mesh axes (a name, a tuple of names, or None).

    `fallback` rules apply to a dimension the main rules leave unsharded, only where their
    mesh axes are still free in that array and divide the dimension. FSDP uses them for
    the MLA latent ranks: `q_b` [q_lora, heads, head_dim] has no `embed` dimension, so
    without ("q_lora", "fsdp") it would be replicated on every FSDP shard, while `q_a`
    [embed, q_lora] already spends `fsdp` on `embed` (a main rule there would map `fsdp`
    twice, which `spec` refuses).
    """

    rules: tuple[tuple[str, MeshAxes], ...]
    fallback: tuple[tuple[str, MeshAxes], ...] = ()

    def __post_init__(self):
        for logical, _ in self.rules + self.fallback:
            if logical not in LOGICAL_AXES:
                raise ValueError(f"ShardingRules: unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
        for logical, mesh_axes in self.rules + self.fallback:
            axes = _as_tuple(mesh_axes)
            for axis in axes:
                if axis not in MESH_AXES:
                    raise ValueError(f"ShardingRules: unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")
            if len(set(axes)) != len(axes):
                raise ValueError(f"ShardingRules: logical axis {logical!r} maps mesh axis "
                                 f"{axes} with a repeat; each mesh axis may appear once")

    def mesh_axes(self, logical: Optional[str]) -> MeshAxes:
        return dict(self.rules).get(logical) if logical else None

    def spec(self, logical_axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
             mesh_shape: Optional[dict] = None) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry these logical names. With
        `shape` and `mesh_shape`, a fallback rule is used only where it divides."""
        parts = [self.mesh_axes(name) for name in logical_axes]
        used = [a for p in parts for a in _as_tuple(p)]
        repeated = sorted({a for a in used if used.count(a) > 1})
        if repeated:
            raise ValueError(f"ShardingRules map mesh axis {repeated[0]!r} twice in one array "
                             f"with logical axes {tuple(logical_axes)}")
        fallback = dict(self.fallback)
        for i, name in enumerate(logical_axes):
            axes = _as_tuple(fallback.get(name)) if parts[i] is None and name else ()
            if not axes or set(axes) & set(used):
                continue
            if shape is not None and mesh_shape is not None and \
                    shape[i] % math.prod(mesh_shape[a] for a in axes):
                continue
            parts[i] = fallback[name]
            used += list(axes)
        return PartitionSpec(*parts)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


_BATCH = ("batch", ("data", "fsdp", "expert"))
# FSDP for the MLA weights without an `embed` dimension (q_b, k_b, v_b and the latent norms)
_FSDP_LATENT = (("q_lora", "fsdp"), ("kv_lora", "fsdp"))


def data_parallel_rules() -> ShardingRules:
    """Pure data parallelism: weights replicated, batch over every axis."""
    return ShardingRules((("batch", ("data", "fsdp", "tensor", "expert")),))


def fsdp_rules() -> ShardingRules:
    """FSDP: weights sharded over `fsdp` along the model width (or an MLA latent rank),
    gathered per layer. (`vocab` on `tensor` only matters on a mesh with tensor > 1.)"""
    return ShardingRules((_BATCH, ("embed", "fsdp"), ("vocab", "tensor")), _FSDP_LATENT)


def fsdp_tp_rules() -> ShardingRules:
    """FSDP + tensor parallel (heads, MLP hidden and vocabulary over `tensor`)."""
    return ShardingRules((_BATCH, ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                          ("mlp", "tensor"), ("vocab", "tensor"), ("expert_mlp", "tensor")),
                         _FSDP_LATENT)


def fsdp_ep_rules() -> ShardingRules:
    """FSDP + expert parallel (routed experts over `expert`)."""
    return ShardingRules((_BATCH, ("embed", "fsdp"), ("experts", "expert"), ("vocab", "tensor")),
                         _FSDP_LATENT)


def default_rules() -> ShardingRules:
    """FSDP + tensor + expert parallel; size-1 mesh axes cost nothing."""
    return ShardingRules((_BATCH, ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                          ("mlp", "tensor"), ("vocab", "tensor"), ("experts", "expert"),
                          ("expert_mlp", "tensor")), _FSDP_LATENT)


RULE_PRESETS = {
    "dp": data_parallel_rules, "fsdp": fsdp_rules, "fsdp_tp": fsdp_tp_rules,
    "fsdp_ep": fsdp_ep_rules, "fsdp_tp_ep": default_rules,
}


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and the rules that place logical axes on it (hashable: a static argument)."""

    mesh: Mesh
    rules: ShardingRules = dataclasses.field(default_factory=default_rules)

    def sharding(self, logical_axes: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
                 name: str = "array") -> NamedSharding:
        spec = self.rules.spec(logical_axes, shape, dict(self.mesh.shape))
        if shape is not None:
            check_divisible(name, shape, spec, self.mesh)
        return NamedSharding(self.mesh, spec)


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raises when a sharded dimension is not divisible by its mesh axes' total size."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        axes = _as_tuple(axes)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            where = f"mesh axis {axes[0]}" if len(axes) == 1 else f"mesh axes {' x '.join(axes)}"
            raise ValueError(f"{name}: dimension {dim} has size {size}, not divisible by {where} "
                             f"of size {parts}")


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]], mesh_rules: Optional[MeshRules]):
    """Sharding constraint on an activation; a no-op without a mesh."""
    if mesh_rules is None:
        return x
    spec = mesh_rules.rules.spec(logical_axes)
    spec = PartitionSpec(*[p if _divides(x.shape[i], p, mesh_rules.mesh) else None
                           for i, p in enumerate(spec)])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh_rules.mesh, spec))


def _divides(size: int, axes: MeshAxes, mesh: Mesh) -> bool:
    return size % math.prod(mesh.shape[a] for a in _as_tuple(axes)) == 0


# Batches across processes --------------------------------------------------------------------

def batch_sharding(mesh_rules: MeshRules) -> NamedSharding:
    """Rows over the rules' `batch` axes, every other dimension whole."""
    return NamedSharding(mesh_rules.mesh, mesh_rules.rules.spec(("batch",)))


def process_rows(mesh_rules: MeshRules, global_rows: int) -> slice:
    """The rows of a global batch that this process feeds (all of them on one process).

    In a multi-process run each process loads only these rows and passes them to
    `global_batch`; rows must divide over the batch axes."""
    sharding = batch_sharding(mesh_rules)
    check_divisible("batch", (global_rows,), sharding.spec, mesh_rules.mesh)
    index = sharding.addressable_devices_indices_map((global_rows,)).values()
    spans = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
                    for i in index})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"this process's devices hold rows {spans} of the batch, not one "
                         "contiguous slice; order the mesh's devices by process")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local_tree, mesh_rules: MeshRules, global_rows: int):
    """One global array per leaf from this process's rows (`process_rows`) of each leaf,
    laid out over the batch axes (`jax.make_array_from_process_local_data`). None leaves
    stay None."""
    sharding = batch_sharding(mesh_rules)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (global_rows, *np.shape(x)[1:])), local_tree)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
    """Rows `rows` of a global array as numpy, read from this process's shards only.

    The inverse of `global_batch`: with `rows = process_rows(...)` and `x` laid out by
    `batch_sharding`, each process gets back the rows it fed. (`np.asarray(x)` would
    need the shards of every process.) A fully addressable array is simply sliced.
    """
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    start, stop = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
    out = np.empty((stop - start, *x.shape[1:]), x.dtype)
    covered = np.zeros(stop - start, bool)
    for shard in x.addressable_shards:
        index = shard.index[0]
        first, last = index.start or 0, x.shape[0] if index.stop is None else index.stop
        lo, hi = max(first, start), min(last, stop)
        if lo >= hi:
            continue
        if any(s != slice(None) for s in shard.index[1:]):
            raise ValueError(f"local_rows: an array of shape {x.shape} with sharding "
                             f"{x.sharding} splits more than its rows; lay it out with "
                             "batch_sharding first")
        out[lo - start:hi - start] = np.asarray(shard.data)[lo - first:hi - first]
        covered[lo - start:hi - start] = True
    if not covered.all():
        missing = int(np.argmin(covered)) + start
        raise ValueError(f"local_rows: row {missing} of rows {start}..{stop} of an array of "
                         f"shape {x.shape} is not on process {jax.process_index()}'s devices "
                         f"(sharding {x.sharding}); ask for this process's `process_rows`")
    return out


def process_sum(values) -> np.ndarray:
    """The sum over processes of each process's numpy `values` (same shape everywhere);
    every process gets the result. On one process, `values` itself."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).sum(0)


def process_mean(values) -> float:
    """The mean of the values of all processes together (`np.mean` on one process).

    Each process passes its own rows' values (e.g. rewards of its completions)."""
    if jax.process_count() == 1:
        return float(np.mean(values))
    values = np.asarray(values, np.float64)
    # gathered as float32 (JAX's default without x64): exact counts up to 2**24 values
    total, count = process_sum(np.array([values.sum(), values.size], np.float32))
    if count == 0:
        raise ValueError("process_mean: no process passed any value")
    return float(total / count)


# Weight declarations -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One weight: shape, dtype, logical axes and initializer. A pytree leaf."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[Optional[str], ...]
    init: Initializer

    def __post_init__(self):
        if len(self.shape) != len(self.logical_axes):
            raise ValueError(f"ArrayInfo: shape {self.shape} and logical axes {self.logical_axes} "
                             "have different ranks")

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


@dataclasses.dataclass(frozen=True)
class Init:
    """An initializer that does not depend on the array's shape: `scale * N(0, 1)` for
    'normal', the constant `scale` for 'constant'. Shape-agnostic initializers let
    stacked (per-layer) weights and whole parameter trees be drawn in one go."""

    kind: str
    scale: float

    def __call__(self, key, shape, dtype):
        if self.kind == "constant":
            return jnp.full(shape, self.scale, dtype)
        return (self.scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def normal_init(std: float) -> Init:
    return Init("normal", float(std))


def fan_in_init(fan_in: int) -> Init:
    """Normal with std 1/sqrt(fan_in): unit-variance outputs for unit-variance inputs."""
    return normal_init(fan_in ** -0.5)


ones_init = Init("constant", 1.0)
zeros_init = Init("constant", 0.0)


def stack_infos(tree, count: int, axis_name: str = "layers"):
    """Prepends a stacking dimension (e.g. layers) to every declaration in a tree."""
    return jax.tree.map(lambda info: ArrayInfo((count, *info.shape), info.dtype,
                                               (axis_name, *info.logical_axes), info.init),
                        tree, is_leaf=is_info)


def abstract(tree, mesh_rules: Optional[MeshRules] = None):
    """`jax.ShapeDtypeStruct` tree (with shardings when a mesh is given); allocates nothing."""
    def leaf(path, info: ArrayInfo):
        sharding = None
        if mesh_rules is not None:
            sharding = mesh_rules.sharding(info.logical_axes, info.shape, jax.tree_util.keystr(path))
        return jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)
    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=is_info)


def shardings(tree, mesh_rules: MeshRules):
    """NamedSharding for every declared array."""
    return jax.tree.map(lambda s: s.sharding, abstract(tree, mesh_rules))


def initializer(tree, mesh_rules: Optional[MeshRules] = None) -> Callable[[jax.Array], Any]:
    """A jitted `key -> arrays` for every declaration. Build it once and reuse it.

    Without a mesh, all normal weights come from one flat draw, sliced per weight: one
    random-number kernel compiles in a fraction of the time of one per weight (15 s ->
    under 1 s for the tiny MoE test model on CPU). With a mesh, each weight is drawn on
    its own (key folded with its position) so that every device makes only its shard.
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_info)
    if mesh_rules is not None:
        def build(key):
            return jax.tree.unflatten(treedef, [info.init(jax.random.fold_in(key, i), info.shape, info.dtype)
                                                for i, info in enumerate(leaves)])
        return jax.jit(build, out_shardings=shardings(tree, mesh_rules))

    def build_flat(key):
        sizes = [info.size if info.init.kind == "normal" else 0 for info in leaves]
        flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
        arrays, offset = [], 0
        for info, size in zip(leaves, sizes):
            if size:
                part = info.init.scale * flat[offset:offset + size].reshape(info.shape)
                arrays.append(part.astype(info.dtype))
            else:
                arrays.append(info.init(None, info.shape, info.dtype))
            offset += size
        return jax.tree.unflatten(treedef, arrays)

    if all(isinstance(info.init, Init) for info in leaves):
        return jax.jit(build_flat)
    return jax.jit(lambda key: jax.tree.unflatten(treedef, [
        info.init(jax.random.fold_in(key, i), info.shape, info.dtype) for i, info in enumerate(leaves)]))


def count(tree) -> int:
    """Number of scalars declared in a tree of `ArrayInfo` or arrays."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=is_info))
