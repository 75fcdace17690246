"""Hugging Face checkpoints: save/load round trips, tensor names and bytes against the
fixtures, FP8 block dequantization by hand, bad inputs, and loading into a mesh.

Files are edited with a small safetensors reader/writer written here (8-byte header
length, JSON header, raw bytes), independent of the library's own parser, and able to
write dtypes the library must refuse.
"""
import json
import pathlib
import pickle
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import r1jax
from r1jax.configs import RopeScaling
from r1jax.convert import dequantize_fp8

from model_fixtures import FIXTURES, fixture, random_params
from model_fixtures import tiny_moe as _tiny_moe

_NP = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}


def read_st(path):
    """{name: (dtype string, shape, raw bytes)}, metadata."""
    blob = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = 8 + n
    out = {}
    for name, v in header.items():
        begin, end = v["data_offsets"]
        out[name] = (v["dtype"], list(v["shape"]), blob[data + begin:data + end])
    return out, meta


def write_st(path, tensors, meta=None):
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def as_array(entry):
    dtype, shape, raw = entry
    return np.frombuffer(raw, _NP[dtype]).reshape(shape)


def assert_same_params(a, b):
    paths = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(paths, leaves_b):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


# Round trips --------------------------------------------------------------------------------

LLAMA = r1jax.configs.tiny_dense(
    model_type="llama", attention_bias=False, tie_word_embeddings=False,
    rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64,
                             low_freq_factor=1.0, high_freq_factor=4.0), eos_token_id=(1, 2))


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_dense", "llama"])
def test_save_load_round_trip_is_bit_exact(tmp_path, name):
    if name == "tiny_moe":
        cfg, params = _tiny_moe()  # MLA + MoE + MTP
    else:
        cfg = r1jax.configs.tiny_dense() if name == "tiny_dense" else LLAMA
        params = random_params(cfg, 1)
    r1jax.save_hf(tmp_path, cfg, params)
    names = set(read_st(tmp_path / "model.safetensors")[0])
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
    loaded_cfg, loaded = r1jax.load_hf(tmp_path)
    assert loaded_cfg == cfg
    assert_same_params(params, loaded)
    if name == "tiny_moe":
        assert loaded.mtp is not None
        assert "model.layers.3.eh_proj.weight" in names
        assert "model.layers.3.mlp.experts.7.down_proj.weight" in names
    if name == "llama":
        written = json.loads((tmp_path / "config.json").read_text())
        assert written["architectures"] == ["LlamaForCausalLM"]


def test_load_without_mtp(tmp_path):
    cfg, params = _tiny_moe()
    r1jax.save_hf(tmp_path, cfg, params)
    loaded_cfg, loaded = r1jax.load_hf(tmp_path, with_mtp=False)
    assert loaded.mtp is None
    assert_same_params(params.moe_layers, loaded.moe_layers)
    assert r1jax.param_count(loaded_cfg) == sum(x.size for x in jax.tree.leaves(loaded))


def test_bfloat16_round_trip(tmp_path):
    cfg = r1jax.configs.tiny_dense(param_dtype="bfloat16")
    params = random_params(cfg, 2)
    r1jax.save_hf(tmp_path, cfg, params)
    tensors, _ = read_st(tmp_path / "model.safetensors")
    assert {t[0] for t in tensors.values()} == {"BF16"}
    loaded_cfg, loaded = r1jax.load_hf(tmp_path, dtype=jnp.bfloat16)
    assert loaded_cfg == cfg
    assert_same_params(params, loaded)


def test_sharded_save_writes_index_and_round_trips(tmp_path):
    cfg, params = _tiny_moe()
    r1jax.save_hf(tmp_path, cfg, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(files)
    total = 0
    for file in files:
        tensors, _ = read_st(tmp_path / file)
        assert sum(len(t[2]) for t in tensors.values()) <= 100_000 or len(tensors) == 1
        for name, entry in tensors.items():
            assert index["weight_map"][name] == file
            total += len(entry[2])
    assert index["metadata"]["total_size"] == total
    assert_same_params(params, r1jax.load_hf(tmp_path)[1])


@pytest.mark.parametrize("name", ["qwen2_tied", "deepseek_v3_yarn", "deepseek_v3_noqlora"])
def test_saved_tensors_match_fixture_names_and_bytes(tmp_path, name):
    """Saving the loaded fixture as bfloat16 reproduces its model.safetensors tensor for
    tensor: same names, dtypes, shapes and bytes (the router bias stays float32)."""
    cfg, params, _ = fixture(name)
    r1jax.save_hf(tmp_path, cfg, params, dtype=jnp.bfloat16)
    ours, meta = read_st(tmp_path / "model.safetensors")
    theirs, _ = read_st(FIXTURES / name / "model.safetensors")
    assert set(ours) == set(theirs)
    for tensor in theirs:
        assert ours[tensor][:2] == theirs[tensor][:2], tensor
        assert ours[tensor][2] == theirs[tensor][2], tensor
    assert meta == {"format": "pt"}
    saved = json.loads((tmp_path / "config.json").read_text())
    reread = r1jax.configs.from_hf_config(saved, param_dtype="float32")
    # equal up to spelling (the fixture leaves Qwen2's head_dim implicit; we write it)
    assert r1jax.configs.to_hf_config(reread) == r1jax.configs.to_hf_config(cfg)
    assert reread.gqa_head_dim == cfg.gqa_head_dim


# FP8 ----------------------------------------------------------------------------------------

def test_dequantize_fp8_by_hand():
    """A [40, 50] e4m3 weight in 16 x 24 blocks: scales [3, 3], the last row and column of
    blocks partial (8 rows, 2 columns)."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(-400, 400, (40, 50)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.5, 2.0, (3, 3)).astype(np.float32)
    want = np.zeros((40, 50), np.float32)
    for i in range(40):
        for j in range(50):
            want[i, j] = float(weight[i, j]) * scale[i // 16, j // 24]
    got = dequantize_fp8(weight, scale, (16, 24))
    assert got.dtype == np.float32 and got.shape == (40, 50)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(r1jax.CheckpointError, match=r"w_scale_inv.*\(3, 3\)"):
        dequantize_fp8(weight, scale[:2], (16, 24), name="w")


def test_fp8_checkpoint_dequantized_on_load():
    """Each FP8 tensor of the fixture loads as its e4m3 values times its block scales."""
    cfg, params, _ = fixture("deepseek_v3_fp8")
    tensors, _ = read_st(FIXTURES / "deepseek_v3_fp8" / "model.safetensors")
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    w = as_array(tensors[name]).astype(np.float32)  # [64, 32]
    s = as_array(tensors[name + "_scale_inv"])  # [4, 2]
    assert s.shape == (4, 2)
    want = np.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            want[i, j] = w[i, j] * s[i // 16, j // 24]
    np.testing.assert_array_equal(np.asarray(params.moe_layers.mlp.down[0, 5]), want.T)
    assert tensors["model.layers.1.mlp.gate.weight"][0] == "BF16"  # the router stays unquantized


# Bad inputs ---------------------------------------------------------------------------------

@pytest.fixture
def qwen_copy(tmp_path):
    folder = tmp_path / "qwen"
    shutil.copytree(FIXTURES / "qwen2_tied", folder)
    return folder


def _edit(folder, fn):
    tensors, meta = read_st(folder / "model.safetensors")
    fn(tensors)
    write_st(folder / "model.safetensors", tensors, meta)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unedited_copy_loads(qwen_copy):
    _edit(qwen_copy, lambda t: None)  # our writer's file is a valid checkpoint
    cfg, params = r1jax.load_hf(qwen_copy)
    assert_same_params(params, fixture("qwen2_tied")[1])


def test_missing_tensor(qwen_copy):
    _edit(qwen_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(r1jax.CheckpointError,
                       match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        r1jax.load_hf(qwen_copy)


def test_unexpected_tensor(qwen_copy):
    extra = ("F32", [4], np.zeros(4, np.float32).tobytes())
    _edit(qwen_copy, lambda t: t.update({"model.layers.0.self_attn.rogue.weight": extra}))
    with pytest.raises(r1jax.CheckpointError,
                       match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rogue\.weight'"):
        r1jax.load_hf(qwen_copy)


def test_shape_mismatch_from_config(qwen_copy):
    _edit_config(qwen_copy, intermediate_size=96)  # the file's MLP is 128 wide
    with pytest.raises(r1jax.CheckpointError, match=r"mlp\.\w+_proj\.weight.*shape"):
        r1jax.load_hf(qwen_copy)


def test_shape_mismatch_same_size(qwen_copy):
    """k_proj [32, 64] stored transposed as [64, 32]: same element count, wrong shape."""
    def transpose(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        arr = as_array(t[name]).T.copy()
        t[name] = ("BF16", list(arr.shape), arr.tobytes())
    _edit(qwen_copy, transpose)
    with pytest.raises(r1jax.CheckpointError, match=r"k_proj\.weight.*shape"):
        r1jax.load_hf(qwen_copy)


def test_unsupported_dtype(qwen_copy):
    def retype(t):
        dtype, shape, raw = t["model.norm.weight"]
        t["model.norm.weight"] = ("U16", shape, raw)
    _edit(qwen_copy, retype)
    with pytest.raises(r1jax.CheckpointError, match=r"'model\.norm\.weight'.*dtype 'U16'"):
        r1jax.load_hf(qwen_copy)


def test_inconsistent_byte_count(qwen_copy):
    def lie(t):
        dtype, shape, raw = t["model.norm.weight"]
        t["model.norm.weight"] = (dtype, [shape[0] * 2], raw)
    _edit(qwen_copy, lie)
    with pytest.raises(r1jax.CheckpointError, match=r"model\.safetensors.*'model\.norm\.weight'"):
        r1jax.load_hf(qwen_copy)


def test_unsupported_architecture(qwen_copy):
    _edit_config(qwen_copy, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(r1jax.CheckpointError, match=r"config\.json.*gpt2"):
        r1jax.load_hf(qwen_copy)


def test_corrupt_file(qwen_copy):
    (qwen_copy / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(r1jax.CheckpointError, match=r"model\.safetensors.*corrupt"):
        r1jax.load_hf(qwen_copy)


def test_corrupt_header(qwen_copy):
    header = b"{not json" + b" " * 7
    (qwen_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(r1jax.CheckpointError, match=r"model\.safetensors.*corrupt"):
        r1jax.load_hf(qwen_copy)


@pytest.mark.parametrize("keep", [5, -100])
def test_truncated_file(qwen_copy, keep):
    path = qwen_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(r1jax.CheckpointError, match=r"model\.safetensors.*truncated"):
        r1jax.load_hf(qwen_copy)


class _Trap:
    """Unpickling this touches a file: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickled_weights_are_refused(qwen_copy):
    (qwen_copy / "model.safetensors").unlink()
    sentinel = qwen_copy.parent / "unpickled"
    (qwen_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(sentinel))))
    with pytest.raises(r1jax.CheckpointError,
                       match="pytorch_model.bin.*pickled weights are never loaded"):
        r1jax.load_hf(qwen_copy)
    assert not sentinel.exists()


def test_missing_config(qwen_copy):
    (qwen_copy / "config.json").unlink()
    with pytest.raises(r1jax.CheckpointError, match=r"qwen.*no config\.json"):
        r1jax.load_hf(qwen_copy)


def test_index_names_a_missing_file(tmp_path):
    cfg = r1jax.configs.tiny_dense()
    r1jax.save_hf(tmp_path, cfg, random_params(cfg, 3), max_shard_bytes=50_000)
    victim = sorted(tmp_path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(r1jax.CheckpointError, match=victim.name + ".*missing"):
        r1jax.load_hf(tmp_path)


# Mesh -------------------------------------------------------------------------------------

def test_load_into_mesh_equals_unsharded_load():
    mesh = r1jax.make_mesh("fsdp=2,tensor=2,expert=2")
    path = FIXTURES / "deepseek_v3_yarn"
    cfg, sharded = r1jax.load_hf(path, mesh=mesh)
    _, params, _ = fixture("deepseek_v3_yarn")
    assert_same_params(params, sharded)
    gate = sharded.moe_layers.mlp.gate  # [layers, experts, d, f]
    assert tuple(gate.sharding.spec) == (None, "expert", "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 4, 32, 16)
    k_b = sharded.moe_layers.attn.k_b  # [layers, c, heads, h]: a slice of kv_b_proj
    assert tuple(k_b.sharding.spec)[:3] == (None, "fsdp", "tensor")  # latent rank on fsdp
    for leaf in jax.tree.leaves(sharded):
        assert len(leaf.sharding.device_set) == 8
