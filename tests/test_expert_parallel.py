"""Expert-parallel MoE (`r1jax.model.expert_parallel`) against the single-device layer:
outputs, expert loads and gradients, for fresh routing and for forced routings (every
token to one expert, most experts idle, an expert chosen twice by one token), on meshes
that exercise each collective path, with a token count that does not divide the mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax import sharding as shd
from r1jax.model import expert_parallel, moe

from model_fixtures import layer, random_params

CFG = r1jax.configs.tiny_moe(first_k_dense_replace=0, num_hidden_layers=1,
                             num_nextn_predict_layers=0)
B, T, K, E = 3, 5, CFG.num_experts_per_tok, CFG.n_routed_experts  # 15 tokens: not a multiple of 8
MESHES = {
    # 1 expert per device; tokens over all 8 devices (padded from 15 to 16)
    "expert8": ("expert=8", shd.default_rules()),
    # experts' hidden width over `tensor` (partial sums over tensor), embed over `fsdp`
    "fsdp_tp_ep": ("fsdp=2,tensor=2,expert=2", shd.default_rules()),
    # batch not split over `expert`: the expert group shares its tokens (no gather, a psum)
    "shared_tokens": ("data=2,expert=4", r1jax.ShardingRules(
        (("batch", "data"), ("embed", "fsdp"), ("experts", "expert")))),
    # remat=True: the chunks and blocks recompute in the backward pass (same values)
    "fsdp_ep_remat": ("fsdp=2,expert=4", shd.fsdp_ep_rules()),
    # moe_matmul='grouped' (the GPU dispatch; XLA's grouped matmul here), hidden width
    # over `tensor`
    "fsdp_tp_ep_grouped": ("fsdp=2,tensor=2,expert=2", shd.default_rules()),
}


def _routing(case: str) -> np.ndarray:
    """experts [B, T, K] to replay (-1: route afresh)."""
    i = np.arange(B * T)
    if case == "routed":
        out = -np.ones((B * T, K))
    elif case == "one_expert_takes_all":  # expert 5 gets every token, the other slot varies
        other = i % (E - 1)
        out = np.stack([np.full_like(i, 5), np.where(other >= 5, other + 1, other)], -1)
    elif case == "most_idle":  # only experts 0 and 1: the devices of 2..7 receive nothing
        out = np.stack([np.zeros_like(i), np.ones_like(i)], -1)
    else:  # "same_expert_twice": a replayed routing may repeat an expert
        out = np.stack([i % E, i % E], -1)
    return out.reshape(B, T, K).astype(np.int32)


CASES = ("routed", "one_expert_takes_all", "most_idle", "same_expert_twice")



@functools.lru_cache(maxsize=None)
def _inputs():
    w = layer(random_params(CFG, 3, with_mtp=False).moe_layers, 0).mlp
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, T, CFG.hidden_size)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((B, T, CFG.hidden_size)), jnp.float32)
    return w, x, probe


@functools.lru_cache(maxsize=None)
def _layer_fn(mesh_name):
    """jit of (y, load, grads of <y, probe> w.r.t. weights and x), one compile per mesh."""
    mesh_rules = None
    if mesh_name is not None:
        spec, rules = MESHES[mesh_name]
        mesh_rules = r1jax.MeshRules(r1jax.make_mesh(spec), rules)

    cfg = CFG.replace(remat=mesh_name is not None and mesh_name.endswith("_remat"),
                      moe_matmul="grouped" if mesh_name and mesh_name.endswith("_grouped") else "auto")

    def f(w, x, probe, experts):
        def loss(w, x):
            y, stats = moe.moe(w, x, cfg, experts, mesh_rules)
            return jnp.sum(y * probe), (y, stats.load)
        (_, (y, load)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, x)
        return y, load, grads

    return jax.jit(f), mesh_rules


@functools.lru_cache(maxsize=None)
def _single(case):
    w, x, probe = _inputs()
    return _layer_fn(None)[0](w, x, probe, jnp.asarray(_routing(case)))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_expert_parallel_equals_single_device(mesh_name):
    fn, mesh_rules = _layer_fn(mesh_name)
    assert expert_parallel.enabled(CFG, mesh_rules)
    w, x, probe = _inputs()
    w_sharded = jax.device_put(w, shd.shardings(moe.moe_infos(CFG), mesh_rules))
    assert w_sharded.gate.sharding.spec[0] == "expert"
    for case in CASES:
        y, load, (gw, gx) = fn(w_sharded, x, probe, jnp.asarray(_routing(case)))
        y1, load1, (gw1, gx1) = _single(case)
        np.testing.assert_array_equal(np.asarray(load), np.asarray(load1), err_msg=case)
        if case == "one_expert_takes_all":
            assert int(load[5]) == B * T
        if case == "most_idle":
            assert int(load[2:].sum()) == 0
        np.testing.assert_allclose(np.asarray(y), np.asarray(y1), atol=1e-5, rtol=0, err_msg=case)
        np.testing.assert_allclose(np.asarray(gx), np.asarray(gx1), atol=1e-5, rtol=0, err_msg=case)
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(gw), jax.tree.leaves(gw),
                              jax.tree.leaves(gw1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5,
                                       err_msg=f"{case}: d/d{jax.tree_util.keystr(path[0])}")


def test_expert_parallel_is_chosen_by_the_mesh():
    """shard_map with the gather / reduce-scatter when experts are split over a mesh axis
    of size > 1; the plain jit path otherwise (no mesh, or expert axis of size 1)."""
    w, x, _ = _inputs()
    jaxpr = lambda mesh_rules: str(jax.make_jaxpr(  # noqa: E731
        lambda w, x: moe.moe(w, x, CFG, None, mesh_rules))(w, x))
    ep = jaxpr(_layer_fn("expert8")[1])
    assert "shard_map" in ep and "all_gather" in ep and "reduce_scatter" in ep
    assert "shard_map" not in jaxpr(None)
    fsdp_only = r1jax.MeshRules(r1jax.make_mesh("fsdp=8"))
    assert not expert_parallel.enabled(CFG, fsdp_only)
    assert "shard_map" not in jaxpr(fsdp_only)


def test_experts_must_divide_the_expert_axis():
    cfg = r1jax.configs.tiny_moe(n_routed_experts=6, n_group=1, topk_group=1)
    with pytest.raises(ValueError, match=r"n_routed_experts=6.*mesh axis expert of size 4"):
        expert_parallel.enabled(cfg, r1jax.MeshRules(r1jax.make_mesh("fsdp=2,expert=4")))
