"""Hugging Face checkpoints <-> r1jax `Params`.

`load_hf` reads a folder (`config.json` + one or many `*.safetensors`, with
`model.safetensors.index.json` when sharded) tensor by tensor, straight into the target
sharding when a mesh is given, so the host never holds two copies of the model: each
device shard is assembled from the tensors (and, for stacked layers/experts, only the
layers) it needs. DeepSeek's FP8 checkpoints (e4m3 with a float32 `weight_scale_inv`
per block) are dequantized on the fly. The MTP layer stored at index
`num_hidden_layers` is loaded into `Params.mtp`.

Files are read with our own safetensors header parser over a memory map (the format is
an 8-byte header length, a JSON header of dtype/shape/offsets, then raw data), which
also lets us name the file and tensor in every error. Pickled weights are never loaded.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from r1jax import configs
from r1jax import sharding as shd
from r1jax.configs import ModelConfig
from r1jax.model import transformer

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as the config says it should."""


# safetensors files -------------------------------------------------------------------------

class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file."""

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file "
                                      f"({size} bytes, shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file: header length "
                                      f"{header_len} exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + header_len
        for name, entry in header.items():
            begin, end = entry.get("data_offsets", (0, -1))
            if entry.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                      f"{entry.get('dtype')!r}")
            expected = math.prod(entry["shape"]) * np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize
            if end - begin != expected:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes; "
                                      f"shape {entry['shape']} {entry['dtype']} needs {expected}")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte "
                    f"{self.data_start + end} but the file has {size} bytes")
        self._map = None

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def get(self, name: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin:self.data_start + end]
        return raw.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class HFFolder:
    """The tensors of a Hugging Face checkpoint folder, by name, across shards."""

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face "
                                  "checkpoint folder with config.json and *.safetensors)")
        if not list(self.path.glob("*.safetensors")):
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = f" (found {pickles}: pickled weights are never loaded)" if pickles else ""
            raise CheckpointError(f"{self.path}: no *.safetensors files{hint}")
        index = self.path / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e!r}); expected a "
                                      "'weight_map' of tensor name -> file") from None
            for name, file in weight_map.items():
                self.where[name] = file
        else:
            for file in sorted(self.path.glob("*.safetensors")):
                for name in SafetensorsFile(file).keys():
                    self.where[name] = file.name

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self.files:
            if not (self.path / file).exists():
                raise CheckpointError(f"{self.path / file}: listed in the index but missing")
            self.files[file] = SafetensorsFile(self.path / file)
        return self.files[file]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> set[str]:
        return set(self.where)

    def raw(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        f = self._file(self.where[name])
        if name not in f.entries:
            raise CheckpointError(f"{f.path}: the index lists tensor {name!r} here, but the file "
                                  "does not contain it")
        return f.get(name)

    def get(self, name: str, block: Optional[tuple[int, int]]) -> np.ndarray:
        """A tensor as float32, dequantizing FP8 block-scaled weights."""
        x = self.raw(name)
        scale_name = name + "_scale_inv"
        if x.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
            if scale_name not in self:
                raise CheckpointError(f"{self.path}: FP8 tensor {name!r} has no {scale_name!r}")
            if block is None:
                raise CheckpointError(f"{self.path}: FP8 tensor {name!r} but config.json has no "
                                      "quantization_config.weight_block_size")
            return dequantize_fp8(x, np.asarray(self.raw(scale_name), np.float32), block, name)
        return np.asarray(x, np.float32)


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                   name: str = "weight") -> np.ndarray:
    """FP8 [out, in] times its per-block scale [ceil(out/bo), ceil(in/bi)] -> float32.

    Edge blocks may be partial when a dimension is not a multiple of the block.
    """
    bo, bi = block
    out_dim, in_dim = weight.shape
    expected = (-(-out_dim // bo), -(-in_dim // bi))
    if scale_inv.shape != expected:
        raise CheckpointError(f"{name}_scale_inv: shape {scale_inv.shape}; a {weight.shape} "
                              f"weight in {bo}x{bi} blocks needs {expected}")
    scale = np.repeat(np.repeat(scale_inv, bo, axis=0), bi, axis=1)[:out_dim, :in_dim]
    return weight.astype(np.float32) * scale


# Name mapping ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """Where one (possibly stacked) r1jax array lives in a Hugging Face checkpoint.

    `template` names the HF tensor with `{layer}` / `{expert}` placeholders for the
    stacked leading axes, whose indices are `layers` and `range(experts)`. An HF linear
    weight is [out, in]: with `transpose` it becomes [in, out] and is reshaped to the
    per-item shape, whose first `in_dims` axes are the input. `in_dims=0` marks a vector
    stored flat (biases). `last_axis` keeps a slice of the last axis (MLA's
    `kv_b_proj` holds both k_b and v_b).
    """

    template: str
    layers: Optional[tuple[int, ...]] = None
    experts: Optional[int] = None
    transpose: bool = False
    in_dims: int = 1
    last_axis: Optional[tuple[int, int]] = None

    def name(self, layer: Optional[int], expert: Optional[int]) -> str:
        return self.template.format(layer=layer, expert=expert)

    def item_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[(self.layers is not None) + (self.experts is not None):]

    def hf_shape(self, item_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the HF tensor must have for an r1jax item of `item_shape`."""
        if self.last_axis is not None:  # the HF tensor holds both slices: not checkable alone
            return ()
        return self.to_hf(np.empty(item_shape, np.int8)).shape

    def to_ours(self, hf: np.ndarray, item_shape: tuple[int, ...]) -> np.ndarray:
        x = hf.T if self.transpose else hf
        if self.last_axis is not None:
            lo, hi = self.last_axis
            x = x.reshape(*item_shape[:-1], -1)[..., lo:hi]
        return x.reshape(item_shape)

    def to_hf(self, item: np.ndarray) -> np.ndarray:
        if self.transpose:
            return item.reshape(math.prod(item.shape[:self.in_dims]), -1).T
        return item.reshape(-1) if self.in_dims == 0 else item


def _sources(layers, experts=None):
    def make(template, **kw):
        return Source(template, layers=layers, experts=experts, **kw)
    return make


def _attention_sources(cfg: ModelConfig, prefix: str, layers) -> dict:
    a = f"{prefix}.self_attn"
    s = _sources(layers)
    if cfg.is_mla:
        h, o = cfg.qk_nope_head_dim, cfg.v_head_dim
        out = {
            "q_b": s(f"{a}.q_b_proj.weight" if cfg.q_lora_rank else f"{a}.q_proj.weight", transpose=True),
            "kv_a": s(f"{a}.kv_a_proj_with_mqa.weight", transpose=True),
            "kv_a_norm": s(f"{a}.kv_a_layernorm.weight"),
            "k_b": s(f"{a}.kv_b_proj.weight", transpose=True, last_axis=(0, h)),
            "v_b": s(f"{a}.kv_b_proj.weight", transpose=True, last_axis=(h, h + o)),
            "o": s(f"{a}.o_proj.weight", transpose=True, in_dims=2),
        }
        if cfg.q_lora_rank:
            out.update(q_a=s(f"{a}.q_a_proj.weight", transpose=True),
                       q_a_norm=s(f"{a}.q_a_layernorm.weight"))
        return out
    out = {k: s(f"{a}.{k}_proj.weight", transpose=True) for k in ("q", "k", "v")}
    out["o"] = s(f"{a}.o_proj.weight", transpose=True, in_dims=2)
    if cfg.attention_bias:
        out.update({f"{k}_bias": s(f"{a}.{k}_proj.bias", in_dims=0) for k in ("q", "k", "v")})
    return out


def _block_sources(cfg: ModelConfig, layers: tuple[int, ...], with_moe: bool, stacked: bool) -> dict:
    lay = layers if stacked else None
    prefix = "model.layers.{layer}" if stacked else f"model.layers.{layers[0]}"
    s = _sources(lay)
    out = {"attn_norm": s(f"{prefix}.input_layernorm.weight"),
           "mlp_norm": s(f"{prefix}.post_attention_layernorm.weight")}
    out.update({f"attn.{k}": v for k, v in _attention_sources(cfg, prefix, lay).items()})
    m = f"{prefix}.mlp"
    if with_moe:
        se = _sources(lay, cfg.n_routed_experts)
        out.update({
            "mlp.router": s(f"{m}.gate.weight", transpose=True),
            "mlp.router_bias": s(f"{m}.gate.e_score_correction_bias"),
            "mlp.gate": se(f"{m}.experts.{{expert}}.gate_proj.weight", transpose=True),
            "mlp.up": se(f"{m}.experts.{{expert}}.up_proj.weight", transpose=True),
            "mlp.down": se(f"{m}.experts.{{expert}}.down_proj.weight", transpose=True),
        })
        if cfg.n_shared_experts:
            out.update({f"mlp.shared.{k}": s(f"{m}.shared_experts.{k}_proj.weight", transpose=True)
                        for k in ("gate", "up", "down")})
    else:
        out.update({f"mlp.{k}": s(f"{m}.{k}_proj.weight", transpose=True) for k in ("gate", "up", "down")})
    return out


def hf_sources(cfg: ModelConfig, with_mtp: bool) -> dict[str, Source]:
    """Every r1jax leaf path (as `jax.tree_util.keystr` without the leading dot) -> Source."""
    out = {"embed": Source("model.embed_tokens.weight"), "final_norm": Source("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = Source("lm_head.weight", transpose=True)
    k, n = cfg.num_dense_layers, cfg.num_hidden_layers
    if k:
        out.update({f"dense_layers.{p}": s for p, s in
                    _block_sources(cfg, tuple(range(k)), False, True).items()})
    if n - k:
        out.update({f"moe_layers.{p}": s for p, s in
                    _block_sources(cfg, tuple(range(k, n)), True, True).items()})
    if with_mtp and cfg.num_nextn_predict_layers:
        m = f"model.layers.{n}"
        out.update({"mtp.enorm": Source(f"{m}.enorm.weight"), "mtp.hnorm": Source(f"{m}.hnorm.weight"),
                    "mtp.eh_proj": Source(f"{m}.eh_proj.weight", transpose=True),
                    "mtp.norm": Source(f"{m}.shared_head.norm.weight")})
        out.update({f"mtp.block.{p}": s for p, s in
                    _block_sources(cfg, (n,), cfg.n_routed_experts > 0, False).items()})
    return out


def _leaf_paths(tree) -> list[tuple[str, object]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=shd.is_info)[0]
    return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf) for path, leaf in flat]


# Loading -----------------------------------------------------------------------------------

def read_config(path: os.PathLike) -> tuple[dict, ModelConfig]:
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        return hf, configs.from_hf_config(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def load_hf(path: os.PathLike, dtype=jnp.float32, mesh=None, rules=None,
            with_mtp: bool = True, **config_overrides) -> tuple[ModelConfig, transformer.Params]:
    """Loads a Hugging Face folder: returns (ModelConfig, Params).

    dtype: parameter dtype (router biases stay float32). mesh/rules: place every array
    directly in its sharding. with_mtp: load the MTP layer when the checkpoint has one.
    Raises `CheckpointError` naming the tensor for a missing, unexpected, mis-shaped or
    unreadable tensor.
    """
    hf, _ = read_config(path)
    cfg = configs.from_hf_config(hf, param_dtype=jnp.dtype(dtype).name, **config_overrides)
    folder = HFFolder(path)
    mtp_present = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in folder
    with_mtp = with_mtp and cfg.num_nextn_predict_layers > 0 and mtp_present
    if not with_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0) if not mtp_present else cfg
    quant = hf.get("quantization_config") or {}
    block = tuple(quant["weight_block_size"]) if "weight_block_size" in quant else None
    infos = transformer.param_infos(cfg, with_mtp=with_mtp)
    sources = hf_sources(cfg, with_mtp)
    _check_names(folder, cfg, sources, with_mtp)
    mesh_rules = shd.MeshRules(mesh, rules or shd.default_rules()) if mesh is not None else None

    arrays = []
    for path_str, info in _leaf_paths(infos):
        src = sources[path_str]
        arrays.append(_load_leaf(folder, src, info, path_str, block, mesh_rules))
    treedef = jax.tree.structure(infos, is_leaf=shd.is_info)
    return cfg, jax.tree.unflatten(treedef, arrays)


def _check_names(folder: HFFolder, cfg: ModelConfig, sources: dict[str, Source], with_mtp: bool):
    expected = set()
    for src in sources.values():
        for layer in (src.layers or (None,)):
            for expert in (range(src.experts) if src.experts else (None,)):
                expected.add(src.name(layer, expert))
    present = folder.names()
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{folder.path}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ignorable = (".weight_scale_inv", "rotary_emb.inv_freq")
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    unexpected = sorted(n for n in present - expected
                        if not n.endswith(ignorable)
                        and not (n.startswith(mtp_prefix) and (not with_mtp or n.endswith(
                            ("embed_tokens.weight", "shared_head.head.weight"))))
                        and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise CheckpointError(f"{folder.path}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + f" for {cfg.model_type} with {cfg.num_hidden_layers} layers")


def _read_item(folder: HFFolder, src: Source, layer, expert, item_shape, block, leaf: str):
    name = src.name(layer, expert)
    hf = folder.get(name, block)
    expected = src.hf_shape(item_shape)
    try:
        if expected and tuple(hf.shape) != expected:
            raise ValueError
        return src.to_ours(hf, item_shape)
    except ValueError:
        want = f"expected {list(expected)}" if expected else f"r1jax item shape {list(item_shape)}"
        raise CheckpointError(f"{folder.path}: tensor {name!r} has shape {list(hf.shape)}; {want} "
                              f"for {leaf} with this config.json") from None


def _load_leaf(folder, src: Source, info: shd.ArrayInfo, leaf: str, block, mesh_rules):
    item_shape = src.item_shape(info.shape)
    stack_dims = info.shape[:len(info.shape) - len(item_shape)]
    dtype = info.dtype

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(info.shape) - len(index))
        stack_idx, item_idx = index[:len(stack_dims)], index[len(stack_dims):]
        ranges = [range(*s.indices(n)) for s, n in zip(stack_idx, stack_dims)]
        layers = [src.layers[i] for i in ranges[0]] if src.layers is not None else [None]
        if src.experts is not None:
            experts = list(ranges[-1])
        else:
            experts = [None]
        rows = []
        for layer in layers:
            items = [np.asarray(_read_item(folder, src, layer, e, item_shape, block, leaf)[item_idx],
                                dtype=dtype) for e in experts]
            rows.append(np.stack(items) if src.experts is not None else items[0])
        return np.stack(rows) if src.layers is not None else rows[0]

    if mesh_rules is None:
        return jax.device_put(read(()))
    sharding = mesh_rules.sharding(info.logical_axes, info.shape, leaf)
    return jax.make_array_from_callback(info.shape, sharding, read)


# Saving ------------------------------------------------------------------------------------

def save_hf(path: os.PathLike, cfg: ModelConfig, params: transformer.Params,
            dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes a Hugging Face folder (config.json, safetensors shards, index when sharded)
    that `transformers` and `load_hf` read. Tensors keep the parameter dtype unless
    `dtype` is given (router biases always float32)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with_mtp = params.mtp is not None
    sources = hf_sources(cfg, with_mtp)
    final: dict[str, np.ndarray] = {}
    parts: dict[str, list] = {}  # kv_b_proj pieces, joined on the last axis below
    for leaf_path, array in _leaf_paths(params):
        src = sources[leaf_path]
        host = np.asarray(jax.device_get(array))
        if dtype is not None and not leaf_path.endswith("router_bias"):
            host = host.astype(jnp.dtype(dtype))
        for li, layer in enumerate(src.layers or (None,)):
            per_layer = host[li] if src.layers is not None else host
            for expert in range(src.experts or 1):
                item = per_layer[expert] if src.experts else per_layer
                name = src.name(layer, expert)
                if src.last_axis is None:
                    final[name] = np.ascontiguousarray(src.to_hf(item))
                else:
                    parts.setdefault(name, []).append((src.last_axis[0], item, src))
    for name, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        joined = np.concatenate([p[1] for p in pieces], axis=-1)
        final[name] = np.ascontiguousarray(pieces[0][2].to_hf(joined))
    if with_mtp:  # released checkpoints repeat the shared embedding and head in the MTP layer
        m = f"model.layers.{cfg.num_hidden_layers}"
        final[f"{m}.embed_tokens.weight"] = final["model.embed_tokens.weight"]
        final[f"{m}.shared_head.head.weight"] = final.get("lm_head.weight", final["model.embed_tokens.weight"])
    _write_shards(path, final, max_shard_bytes, save_file)
    hf = configs.to_hf_config(cfg.replace(param_dtype=jnp.dtype(dtype).name if dtype is not None
                                          else cfg.param_dtype))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id,
           "eos_token_id": list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else
           (cfg.eos_token_id[0] if cfg.eos_token_id else None)}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _write_shards(path: pathlib.Path, tensors: dict[str, np.ndarray], max_bytes: int, save_file):
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
