"""Meshes, sharding rules and weight declarations (8 simulated CPU devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import r1jax
from r1jax import sharding as shd
from r1jax.model import transformer


def test_make_mesh_axes_and_shape():
    mesh = r1jax.make_mesh("fsdp=4,expert=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 2}
    assert mesh.devices.size == 8 and len(set(mesh.devices.ravel().tolist())) == 8
    assert dict(r1jax.make_mesh("").shape) == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert dict(r1jax.make_mesh({"tensor": 2, "data": 4}).shape)["tensor"] == 2
    one = r1jax.make_mesh("", devices=jax.devices()[:1])
    assert dict(one.shape)["fsdp"] == 1


@pytest.mark.parametrize("spec, pattern", [
    ("fsdp=3", r"fsdp=3.*needs 3 devices.*8"),  # product != device count
    ("fsdp=4,tensor=4", r"fsdp=4, tensor=4.*16 devices"),
    ("fsdp=4,model=2", r"unknown axis 'model'"),
    ("fsdp=two", r"axis 'fsdp'.*integer.*'two'"),
    ("expert=0,fsdp=8", r"axis 'expert'.*size 0"),
])
def test_bad_mesh_specs(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        r1jax.make_mesh(spec)


def test_rules_refuse_one_mesh_axis_twice_in_a_spec():
    rules = r1jax.ShardingRules((("embed", "fsdp"), ("heads", "fsdp"), ("mlp", "tensor")))
    assert rules.spec(("embed", "mlp")) == P("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"mesh axis 'fsdp' twice.*\('embed', 'heads'\)"):
        rules.spec(("embed", "heads"))
    with pytest.raises(ValueError, match=r"'batch' maps mesh axis \('data', 'data'\) with a repeat"):
        r1jax.ShardingRules((("batch", ("data", "data")),))


def test_rules_refuse_unknown_axes():
    with pytest.raises(ValueError, match="unknown logical axis 'width'"):
        r1jax.ShardingRules((("width", "fsdp"),))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        r1jax.ShardingRules((("embed", "model"),))
    with pytest.raises(ValueError, match="unknown mesh axis 'pipe'"):
        r1jax.ShardingRules((("batch", ("data", "pipe")),))


def test_default_rules_specs():
    rules = shd.default_rules()
    assert rules.spec(("experts", "embed", "expert_mlp")) == P("expert", "fsdp", "tensor")
    assert rules.spec(("batch", "seq", "act_embed")) == P(("data", "fsdp", "expert"), None, None)
    assert rules.spec(("layers", None, "vocab")) == P(None, None, "tensor")
    for preset in shd.RULE_PRESETS.values():  # every preset is a valid rule set for every weight
        mesh_rules = r1jax.MeshRules(r1jax.make_mesh("fsdp=2,tensor=2,expert=2"), preset())
        shd.abstract(transformer.param_infos(r1jax.configs.tiny_moe()), mesh_rules)


def test_indivisible_dimension_names_axis_and_dimension():
    """tiny_dense has 2 key/value heads: they cannot be split 4 ways over `tensor`."""
    cfg = r1jax.configs.tiny_dense()
    mesh = r1jax.make_mesh("tensor=4,fsdp=2")
    with pytest.raises(ValueError,
                       match=r"attn\.k.*dimension 2 has size 2.*mesh axis tensor of size 4"):
        r1jax.init_params(jax.random.key(0), cfg, mesh=mesh)
    with pytest.raises(ValueError, match=r"tensor of size 4"):
        r1jax.abstract_params(cfg, mesh)


def test_abstract_allocates_nothing_and_carries_shardings():
    """The 671B model's abstract tree on an 8-device mesh: ShapeDtypeStructs with their
    NamedShardings, built without allocating (1.3 TB could not be allocated here)."""
    cfg = r1jax.configs.deepseek_v3_671b()
    mesh = r1jax.make_mesh("fsdp=2,tensor=2,expert=2")
    live = len(jax.live_arrays())
    tree = r1jax.abstract_params(cfg, mesh)
    assert len(jax.live_arrays()) == live
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in leaves)
    gate = tree.moe_layers.mlp.gate
    assert gate.shape == (58, 256, 7168, 2048)
    assert gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert gate.sharding.shard_shape(gate.shape) == (58, 128, 3584, 1024)
    assert sum(x.size for x in leaves) == r1jax.param_count(cfg, with_mtp=True)
    # without a mesh: shapes only
    assert all(x.sharding is None for x in jax.tree.leaves(r1jax.abstract_params(cfg)))


def test_array_info_and_count():
    with pytest.raises(ValueError, match="different ranks"):
        shd.ArrayInfo((2, 3), jnp.float32, ("embed",), shd.zeros_init)
    tree = {"a": shd.ArrayInfo((2, 3), jnp.float32, ("embed", "mlp"), shd.zeros_init),
            "b": shd.stack_infos({"c": shd.ArrayInfo((5,), jnp.float32, ("embed",), shd.ones_init)},
                                 4)}
    assert shd.count(tree) == 6 + 20
    assert tree["b"]["c"].shape == (4, 5) and tree["b"]["c"].logical_axes == ("layers", "embed")


def test_constrain_is_noop_without_mesh_and_skips_indivisible_dims():
    x = jnp.arange(12.0).reshape(3, 4)
    assert shd.constrain(x, ("batch", "act_embed"), None) is x
    mesh_rules = r1jax.MeshRules(r1jax.make_mesh("fsdp=2,tensor=2,expert=2"))
    y = jax.jit(lambda x: shd.constrain(x, ("vocab", "embed"), mesh_rules))(x)
    # vocab -> tensor does not divide 3 and is left unsharded; embed -> fsdp divides 4
    assert y.sharding.spec == P(None, "fsdp")
    np.testing.assert_array_equal(y, x)
