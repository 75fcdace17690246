"""DeepSeekMoE: routing on hand-built scores, dropless dispatch against a dense reference
written here, balancing updates and losses against hand computations, and the cost of
the block dispatch as the number of experts grows."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax.model import layers, moe


def _cfg(**kw):
    """A DeepSeek-V3 config whose routing fields are the ones under test."""
    base = dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
                topk_method="noaux_tc", n_shared_experts=0, first_k_dense_replace=0,
                num_nextn_predict_layers=0)
    base.update(kw)
    return r1jax.configs.tiny_moe(**base)


# jitted once each: many small eager ops each compile on their own, which is slower
_select = jax.jit(moe.select_experts, static_argnums=2)
_gate_weights = jax.jit(moe.gate_weights, static_argnums=2)
_route = jax.jit(moe.route, static_argnums=2)
_balance = jax.jit(moe.sequence_balance_loss, static_argnums=2)


def _sorted(experts, weights=None):
    experts = np.asarray(experts)
    order = np.argsort(experts, axis=-1)
    out = np.take_along_axis(experts, order, -1)
    if weights is None:
        return out
    return out, np.take_along_axis(np.asarray(weights), order, -1)


# Routing ------------------------------------------------------------------------------------

# 8 experts in 4 groups of 2; choose 3 experts from the best 2 groups.
SCORES = np.array([0.9, 0.1, 0.5, 0.6, 0.8, 0.7, 0.2, 0.3], np.float32)
BIAS = np.array([-0.5, 0.0, 0.28, 0.0, 0.0, 0.0, 0.55, 0.6], np.float32)
# biased c = s + b = [0.4, 0.1, 0.78, 0.6, 0.8, 0.7, 0.75, 0.9]
# group scores (sum of the two best c): [0.5, 1.38, 1.5, 1.65] -> groups 3 and 2
# best 3 of c among experts 4..7 {0.8, 0.7, 0.75, 0.9}: experts 4, 6, 7
# (without the group limit: 7, 4, 2; on unbiased scores: 0, 4, 5)
# weights: unbiased s of 4, 6, 7 = 0.8, 0.2, 0.3; / 1.3; * 2.5
HAND_EXPERTS = [4, 6, 7]
HAND_WEIGHTS = [0.8 / 1.3 * 2.5, 0.2 / 1.3 * 2.5, 0.3 / 1.3 * 2.5]


def test_noaux_tc_group_limited_topk_by_hand():
    cfg = _cfg()
    experts = _select(jnp.asarray(SCORES[None]), jnp.asarray(BIAS), cfg)
    assert experts.dtype == jnp.int32
    np.testing.assert_array_equal(_sorted(experts)[0], HAND_EXPERTS)
    weights = _gate_weights(jnp.asarray(SCORES[None]), experts, cfg)
    np.testing.assert_allclose(_sorted(experts, weights)[1][0], HAND_WEIGHTS, rtol=1e-6)


def test_route_applies_sigmoid_and_bias_only_for_choice():
    """route() from x with an identity router: logits = x, scores = sigmoid(x)."""
    cfg = _cfg(hidden_size=8)
    logits = np.log(SCORES / (1 - SCORES))  # sigmoid(logits) = SCORES
    w = moe.MoEWeights(router=jnp.eye(8), router_bias=jnp.asarray(BIAS), gate=None, up=None,
                       down=None, shared=None)
    experts, weights, scores = _route(jnp.asarray(logits[None]), w, cfg)
    np.testing.assert_allclose(scores[0], SCORES, rtol=1e-6)
    got_e, got_w = _sorted(experts, weights)
    np.testing.assert_array_equal(got_e[0], HAND_EXPERTS)
    np.testing.assert_allclose(got_w[0], HAND_WEIGHTS, rtol=1e-6)
    # replaying recorded experts recomputes the weights from the scores at those experts
    replay = jnp.asarray([[0, 1, 2]], jnp.int32)
    _, w_replay, _ = _route(jnp.asarray(logits[None]), w, cfg, replay)
    np.testing.assert_allclose(w_replay[0], np.array([0.9, 0.1, 0.5]) / 1.5 * 2.5, rtol=1e-6)


def test_no_group_limit_and_no_bias():
    cfg = _cfg(topk_group=4)  # every group kept
    experts = _select(jnp.asarray(SCORES[None]), jnp.asarray(BIAS), cfg)
    np.testing.assert_array_equal(_sorted(experts)[0], [2, 4, 7])
    experts = _select(jnp.asarray(SCORES[None]), jnp.zeros(8), _cfg(topk_group=4))
    np.testing.assert_array_equal(_sorted(experts)[0], [0, 4, 5])


def test_group_score_is_sum_of_two_best():
    """9 experts in 3 groups of 3, keep 1 group, choose 2 experts. The group picked
    differs by how a group is scored: sum of its two best (noaux_tc, V3) -> group 1;
    its best (group_limited_greedy, V2) -> group 0; (sum of all three would give group 2)."""
    c = np.array([0.95, 0.1, 0.05, 0.61, 0.59, 0.0, 0.5, 0.45, 0.45], np.float32)
    # two best: 1.05, 1.20, 0.95; best: 0.95, 0.61, 0.5; all: 1.10, 1.20, 1.40
    kw = dict(n_routed_experts=9, num_experts_per_tok=2, n_group=3, topk_group=1)
    v3 = _select(jnp.asarray(c[None]), jnp.zeros(9), _cfg(**kw))
    np.testing.assert_array_equal(_sorted(v3)[0], [3, 4])
    v2 = _select(jnp.asarray(c[None]), jnp.zeros(9),
                            _cfg(topk_method="group_limited_greedy", scoring_func="softmax", **kw))
    np.testing.assert_array_equal(_sorted(v2)[0], [0, 1])


def test_softmax_greedy_v2_lite():
    """V2-Lite: softmax scores, plain top-k, no renormalisation, scale 1, bias ignored."""
    cfg = _cfg(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
               scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
               routed_scaling_factor=1.0, hidden_size=4)
    w = moe.MoEWeights(router=jnp.eye(4), router_bias=jnp.asarray([10.0, 0, 0, 0]), gate=None,
                       up=None, down=None, shared=None)
    x = jnp.log(jnp.asarray([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.0, 2.0]]))  # softmax: /10
    experts, weights, scores = _route(x, w, cfg)
    np.testing.assert_allclose(scores, [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.1, 0.2]], rtol=1e-6)
    got_e, got_w = _sorted(experts, weights)
    np.testing.assert_array_equal(got_e, [[2, 3], [0, 1]])
    np.testing.assert_allclose(got_w, [[0.3, 0.4], [0.4, 0.3]], rtol=1e-6)
    # with renormalisation and a scale: 0.3/0.7*2, 0.4/0.7*2
    _, w2, _ = _route(x, w, cfg.replace(norm_topk_prob=True, routed_scaling_factor=2.0))
    np.testing.assert_allclose(_sorted(experts, w2)[1][0], [0.6 / 0.7, 0.8 / 0.7], rtol=1e-6)


# Dispatch -----------------------------------------------------------------------------------

def _dense_reference(x, experts, weights, gate, up, down):
    """y[n] = sum_k weights[n, k] * down_e(silu(gate_e x) * up_e x), e = experts[n, k]:
    every expert on every token, masked. jnp, so it can be differentiated."""
    hp = jax.lax.Precision.HIGHEST
    g = jnp.einsum("nd,edf->enf", x, gate, precision=hp)
    u = jnp.einsum("nd,edf->enf", x, up, precision=hp)
    y_e = jnp.einsum("enf,efd->end", jax.nn.silu(g) * u, down, precision=hp)  # [e, n, d]
    mix = (jax.nn.one_hot(experts, gate.shape[0]) * weights[..., None]).sum(1)  # [n, e]
    return jnp.einsum("ne,end->nd", mix, y_e, precision=hp)


def _np_reference(x, experts, weights, gate, up, down):
    """The same in float64 numpy, token by token, expert by expert (no compilation)."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    experts, weights = np.asarray(experts), np.asarray(weights, np.float64)
    y = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j, e in enumerate(experts[i]):
            g, u = x[i] @ gate[e], x[i] @ up[e]
            y[i] += weights[i, j] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    return y


def _case(n, k, e, d, f, assign, seed=0):
    rng = np.random.default_rng(seed)
    if assign == "random":
        experts = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    elif assign == "some_empty":  # experts 0, 2, 5 receive nothing
        allowed = np.array([i for i in range(e) if i not in (0, 2, 5)])
        experts = np.stack([rng.choice(allowed, k, replace=False) for _ in range(n)])
    elif assign == "one_takes_all":  # every token picks expert 3 (and one other)
        others = np.array([i for i in range(e) if i != 3])
        experts = np.stack([[3, rng.choice(others)] for _ in range(n)])[:, :k]
    elif assign == "two_experts":  # all tokens on the same two experts
        experts = np.tile([6, 1], (n, 1))[:, :k]
    else:
        raise ValueError(assign)
    arrays = dict(
        x=rng.standard_normal((n, d)), experts=experts, weights=rng.uniform(0.1, 1.0, (n, k)),
        gate=rng.standard_normal((e, d, f)) / np.sqrt(d),
        up=rng.standard_normal((e, d, f)) / np.sqrt(d),
        down=rng.standard_normal((e, f, d)) / np.sqrt(f))
    return {name: jnp.asarray(a, jnp.int32 if name == "experts" else jnp.float32)
            for name, a in arrays.items()}


_blocks = jax.jit(moe.expert_ffn_blocks, static_argnums=6)
_ragged = jax.jit(moe.expert_ffn_ragged)


@pytest.mark.parametrize("assign", ["random", "some_empty", "one_takes_all", "two_experts"])
@pytest.mark.parametrize("block", [8, 16])
def test_dispatch_equals_dense_reference(assign, block):
    c = _case(n=37, k=2, e=8, d=16, f=24, assign=assign)  # 74 rows: not a multiple of a block
    args = (c["x"], c["experts"], c["weights"], c["gate"], c["up"], c["down"])
    want = _np_reference(*args)
    got, load = _blocks(*args, block)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(load, np.bincount(np.asarray(c["experts"]).ravel(), minlength=8))
    if block == 8:  # the ragged path does not depend on the block size
        got_r, load_r = _ragged(*args)
        np.testing.assert_allclose(got_r, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(load_r, load)


@pytest.mark.parametrize("out_major", [False, True], ids=["in_major", "out_major"])
@pytest.mark.parametrize("assign", ["random", "some_empty", "two_experts"])
def test_wide_experts_equal_dense_reference(assign, out_major):
    """The decode layout: experts side by side, every expert over every token; also with
    both wide matrices output-major (the sampler's CPU layout), and back to stacked."""
    c = _case(n=5, k=2, e=8, d=16, f=24, assign=assign)
    wide = moe.widen_experts(c["gate"], c["up"], c["down"])
    assert wide.gate_up.shape == (16, 8 * 2 * 24) and wide.down.shape == (8 * 24, 16)
    if out_major:
        wide = moe.WideExperts(layers.out_major(wide.gate_up), layers.out_major(wide.down))
    for back, orig in zip(moe.narrow_experts(wide, 8), (c["gate"], c["up"], c["down"])):
        np.testing.assert_array_equal(back, orig)
    got, load = jax.jit(moe.expert_ffn_wide, static_argnums=4)(c["x"], c["experts"], c["weights"], wide, 8)
    want = _np_reference(c["x"], c["experts"], c["weights"], c["gate"], c["up"], c["down"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(load, np.bincount(np.asarray(c["experts"]).ravel(), minlength=8))


def test_blocks_dispatch_gradients_equal_dense_reference():
    c = _case(n=21, k=2, e=8, d=16, f=24, assign="some_empty", seed=1)
    names = ("x", "weights", "gate", "up", "down")
    cot = jax.random.normal(jax.random.key(0), c["x"].shape)

    def loss(fn):
        def f(x, weights, gate, up, down):
            y = fn(x, c["experts"], weights, gate, up, down)
            return jnp.sum((y[0] if isinstance(y, tuple) else y) * cot)
        return f

    diff = [c[n] for n in names]
    argnums = tuple(range(5))
    want = jax.jit(jax.grad(loss(_dense_reference), argnums))(*diff)
    got = jax.jit(jax.grad(loss(lambda *a: moe.expert_ffn_blocks(*a, 8)), argnums))(*diff)
    for name, g, w in zip(names, got, want):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    # experts that receive no tokens get exactly zero gradient
    gate_grad = np.asarray(got[2])
    assert np.all(gate_grad[[0, 2, 5]] == 0) and np.all(np.abs(gate_grad[[1, 3]]).sum((1, 2)) > 0)


def test_block_size_choice():
    assert moe.block_size(1024, 8) == 64  # about half the mean rows per expert
    assert moe.block_size(1024, 256) == 8  # never below 8
    assert moe.block_size(10 ** 6, 4) == 256  # never above 256
    assert moe.block_size(1000, 8) == 32  # a power of two (62 -> 32)


# Balancing ----------------------------------------------------------------------------------

def test_update_router_bias_by_hand():
    bias = jnp.asarray([[0.0, 0.1, -0.2, 0.3], [1.0, 1.0, 1.0, 1.0]])
    load = jnp.asarray([[1, 2, 3, 6], [4, 4, 4, 4]], jnp.int32)  # means 3 and 4
    new = moe.update_router_bias(bias, load, gamma=0.01)
    # under-loaded experts (load < mean) go up by gamma, over-loaded down, at-mean unchanged
    np.testing.assert_allclose(new, [[0.01, 0.11, -0.2, 0.29], [1.0, 1.0, 1.0, 1.0]], rtol=1e-6)


def test_sequence_balance_loss_by_hand():
    """alpha * mean over rows of sum_i f_i P_i with f_i = E/(K T) * count_i and P_i the
    row's mean of s_i / sum_j s_j. E=4, K=2, alpha=0.1.
    Row 0 (T=2): scores [.5 .3 .1 .1] and [.4 .4 .8 .4] (sum 2: normalised .2 .2 .4 .2);
      experts {0,1}, {2,0}: counts [2 1 1 0], f = counts * 4/4 = [2 1 1 0];
      P = [.35 .25 .25 .15]; sum f P = .7 + .25 + .25 = 1.2.
    Row 1 (T=2, second token masked): scores [.1 .2 .3 .4]; experts {3,2}: f = [0 0 2 2]
      (T=1: 4/(2*1)); P = [.1 .2 .3 .4]; sum f P = .6 + .8 = 1.4.
    loss = 0.1 * (1.2 + 1.4) / 2 = 0.13."""
    cfg = _cfg(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
               aux_loss_alpha=0.1)
    scores = jnp.asarray([[[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.8, 0.4]],
                          [[0.1, 0.2, 0.3, 0.4], [0.9, 0.9, 0.9, 0.9]]])
    experts = jnp.asarray([[[0, 1], [2, 0]], [[3, 2], [0, 1]]], jnp.int32)
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
    loss = _balance(scores, experts, cfg, mask)
    assert abs(float(loss) - 0.13) < 1e-6
    # unmasked row 1: counts [1 1 1 1] -> f = 1; P = mean of [.1 .2 .3 .4] and [.25]*4
    unmasked = _balance(scores, experts, cfg)
    assert abs(float(unmasked) - 0.1 * (1.2 + 1.0) / 2) < 1e-6


def test_moe_layer_reports_load_and_balance():
    """moe(): load counts per expert, experts per token, and the balance loss agree with
    the routing it reports."""
    cfg = _cfg(hidden_size=16, moe_intermediate_size=8, n_shared_experts=1, aux_loss_alpha=0.01)
    rng = np.random.default_rng(0)
    e, d, f = 8, 16, 8
    w = moe.MoEWeights(
        router=jnp.asarray(rng.standard_normal((d, e)) / 4, jnp.float32),
        router_bias=jnp.asarray(0.1 * rng.standard_normal(e), jnp.float32),
        gate=jnp.asarray(rng.standard_normal((e, d, f)) / 4, jnp.float32),
        up=jnp.asarray(rng.standard_normal((e, d, f)) / 4, jnp.float32),
        down=jnp.asarray(rng.standard_normal((e, f, d)) / 3, jnp.float32),
        shared=moe.MLPWeights(*(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32)
                                for s in ((d, f), (d, f), (f, d)))))
    x = jnp.asarray(rng.standard_normal((2, 5, d)), jnp.float32)
    y, stats = jax.jit(moe.moe, static_argnums=2)(w, x, cfg)
    experts = np.asarray(stats.experts)
    assert experts.shape == (2, 5, 3)
    np.testing.assert_array_equal(stats.load, np.bincount(experts.ravel(), minlength=e))
    assert int(stats.load.sum()) == 2 * 5 * 3
    # output, by hand: sigmoid router scores, chosen experts' weights renormalised * 2.5,
    # routed experts + the shared expert
    xs = np.asarray(x, np.float64).reshape(10, d)
    chosen = experts.reshape(10, 3)
    scores = 1 / (1 + np.exp(-(xs @ np.asarray(w.router, np.float64))))
    picked = np.take_along_axis(scores, chosen, -1)
    weights = picked / picked.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    sg, su, sd = (np.asarray(a, np.float64) for a in (w.shared.gate, w.shared.up, w.shared.down))
    shared = ((xs @ sg) / (1 + np.exp(-(xs @ sg))) * (xs @ su)) @ sd
    want = _np_reference(xs, chosen, weights, w.gate, w.up, w.down) + shared
    np.testing.assert_allclose(y.reshape(10, d), want, atol=1e-5)
    # the chosen experts are the top 3 of score + bias inside the best 2 groups of 2
    biased = scores + np.asarray(w.router_bias, np.float64)
    for row, c in zip(biased, chosen):
        groups = np.sort(row.reshape(4, 2), -1)[:, -2:].sum(-1)
        keep = np.argsort(groups)[-2:]
        allowed = np.concatenate([np.arange(2 * g, 2 * g + 2) for g in keep])
        best = allowed[np.argsort(row[allowed])[-3:]]
        assert set(best.tolist()) == set(c.tolist())
    # balance loss: alpha * mean over rows of sum_i (E / (K T) * count_i) * mean_t(s_i / sum s)
    counts = np.stack([np.bincount(row.ravel(), minlength=e) for row in experts])  # [b, e]
    p_mean = (scores / scores.sum(-1, keepdims=True)).reshape(2, 5, e).mean(1)
    want_balance = 0.01 * np.mean(np.sum(counts * e / (3 * 5) * p_mean, -1))
    assert abs(float(stats.balance_loss) - want_balance) < 1e-6 * want_balance

    # the same layer in bfloat16: routing still in float32 (same experts here), output close
    bf = jax.tree.map(lambda a: a if a.ndim == 1 else a.astype(jnp.bfloat16), w)
    assert bf.router_bias.dtype == jnp.float32 and bf.gate.dtype == jnp.bfloat16
    y_bf, stats_bf = jax.jit(moe.moe, static_argnums=2)(
        bf, x.astype(jnp.bfloat16), cfg.replace(dtype="bfloat16", param_dtype="bfloat16"))
    assert y_bf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(stats_bf.experts, stats.experts)
    np.testing.assert_allclose(np.asarray(y_bf, np.float32), y, atol=0.05 * float(jnp.abs(y).max()))


# Cost ---------------------------------------------------------------------------------------

def _dispatch_shapes(n, k, e, d, f):
    """Abstract (x, experts, weights, gate, up, down) for n tokens, top-k, e experts."""
    s = jax.ShapeDtypeStruct
    return (s((n, d), jnp.float32), s((n, k), jnp.int32), s((n, k), jnp.float32),
            s((e, d, f), jnp.float32), s((e, d, f), jnp.float32), s((e, f, d), jnp.float32))


def _dot_flops(jaxpr) -> float:
    """Worst-case FLOPs of every dot_general in a jaxpr, through nested jaxprs: a scan
    body counts `length` times, a cond counts its most expensive branch."""
    from jax.extend.core import jaxprs_in_params
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contract = math.prod(lhs[i] for i in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contract
        elif name == "cond":
            total += max(_dot_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "scan":
            total += eqn.params["length"] * _dot_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "while":
            raise AssertionError("a while loop has no static trip count to count FLOPs with")
        else:
            total += sum(_dot_flops(sub) for sub in jaxprs_in_params(eqn.params))
    return total


def test_block_dispatch_cost_does_not_grow_with_experts():
    """Expert FLOPs of the block dispatch for fixed n=512 tokens, k=2, d=f=64 while the
    number of experts grows 8 -> 64 -> 256, with the block size moe() would choose.

    Method: XLA's cost_analysis counts a loop body once (so it cannot see the trip count),
    hence FLOPs are counted from the jaxpr: every dot_general (2 * output size *
    contracted size), a `scan` body (lax.map over blocks) times its static length, a
    `cond` (skipping unoccupied blocks) at its costlier branch. That is the static worst
    case: every one of the (n*k/block + e) blocks the dispatch can ever run, computed.
    Dense compute (every expert on every token, counted the same way from the reference
    above) grows 32x from 8 to 256 experts; the dispatch must grow less than 3x."""
    n, k, d, f = 512, 2, 64, 64
    flops, dense = {}, {}
    for e in (8, 64, 256):
        args = _dispatch_shapes(n, k, e, d, f)
        block = moe.block_size(n * k, e)
        jaxpr = jax.make_jaxpr(lambda *a: moe.expert_ffn_blocks(*a, block))(*args).jaxpr
        flops[e] = _dot_flops(jaxpr)
        dense[e] = _dot_flops(jax.make_jaxpr(_dense_reference)(*args).jaxpr)
    useful = 3 * 2 * n * k * d * f  # gate, up, down on the n*k routed rows
    assert flops[8] >= useful
    assert dense[256] / dense[8] > 30  # the counter sees growth when there is growth
    assert flops[256] / flops[8] < 3, flops
    assert flops[256] < 4 * useful, flops


def test_ragged_dot_cost_grows_with_experts_on_cpu():
    """Why 'blocks' is the default: on CPU, XLA lowers ragged_dot densely over all experts,
    so its FLOPs (from XLA's own cost analysis; no loops here) grow linearly with e."""
    n, k, d, f = 512, 2, 64, 64
    flops = {}
    for e in (8, 64):
        args = _dispatch_shapes(n, k, e, d, f)
        cost = jax.jit(moe.expert_ffn_ragged).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[e] = cost["flops"]
    if jax.default_backend() != "cpu":
        pytest.skip("documents the CPU lowering")
    assert flops[64] / flops[8] > 6, flops


# Block dispatch: block sizes per level and the custom VJP -----------------------------------

def test_block_plan():
    assert moe._block_plan(256, 3) == (512, 256, 128, 64)
    assert moe._block_plan(256, 0) == (256,)  # all blocks of `block` rows
    assert moe._block_plan(32, 3) == (64, 32, 16, 8)
    assert moe._block_plan(16, 3) == (16, 8)  # never below 8
    assert moe._block_plan(8, 2) == (8,)


@pytest.mark.parametrize("levels", [0, 1, 3])
def test_blocks_dispatch_levels_gradients_equal_dense_reference(levels):
    """Output and gradients (x, gate weights, expert weights) of the block dispatch with
    blocks of (32), (64, 32) and (64, 32, 16, 8) rows against the dense reference: expert 3 receives every token,
    experts 0, 2, 5 none, and some pairs are marked outside [0, e) (skipped: the reference's
    one_hot is zero there), under jit and jax.checkpoint alike."""
    n, k, e, d, f = 45, 3, 8, 16, 24
    c = _case(n=n, k=k, e=e, d=d, f=f, assign="random", seed=2)
    rng = np.random.default_rng(3)
    experts = np.stack([np.full(n, 3), rng.choice([1, 4, 6, 7], n), rng.choice([1, 4, 6], n)], 1)
    experts[rng.choice(n, 5, replace=False), 2] = -1
    experts[rng.choice(n, 4, replace=False), 1] = e
    experts = jnp.asarray(experts, jnp.int32)
    names = ("x", "weights", "gate", "up", "down")
    cot = jax.random.normal(jax.random.key(1), (n, d))

    def loss(fn):
        def g(x, weights, gate, up, down):
            y = fn(x, experts, weights, gate, up, down)
            return jnp.sum((y[0] if isinstance(y, tuple) else y) * cot)
        return g

    blocks = lambda *a: moe.expert_ffn_blocks(*a, 32, levels=levels)
    blocks_remat = jax.checkpoint(blocks)
    diff = [c[name] for name in names]
    want = jax.jit(jax.value_and_grad(loss(_dense_reference), tuple(range(5))))(*diff)
    for fn in (blocks, blocks_remat):
        got = jax.jit(jax.value_and_grad(loss(fn), tuple(range(5))))(*diff)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
        for name, g, w in zip(names, got[1], want[1]):
            assert float(jnp.abs(w).max()) > 0
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
        gate_grad = np.asarray(got[1][2])
        assert np.all(gate_grad[[0, 2, 5]] == 0)
        assert np.all(np.abs(gate_grad[[1, 3, 4, 6, 7]]).sum((1, 2)) > 0)
        weights_grad = np.asarray(got[1][1])
        assert np.all(weights_grad[np.asarray(experts) < 0] == 0)
        assert np.all(weights_grad[np.asarray(experts) >= e] == 0)
    y, load = jax.jit(blocks)(*(c["x"], experts, c["weights"], c["gate"], c["up"], c["down"]))
    kept = (np.asarray(experts) >= 0) & (np.asarray(experts) < e)
    want_y = _np_reference(c["x"], np.where(kept, experts, 0), np.where(kept, c["weights"], 0),
                           c["gate"], c["up"], c["down"])
    np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(load, np.bincount(np.asarray(experts)[kept], minlength=e))


def test_blocks_dispatch_forward_mode_equals_dense_reference():
    """jax.jvp (under vmap over tangents) through the block dispatch: its tangent map is a
    primitive of its own (reverse mode transposes it with the block loops)."""
    n, k, e, d, f = 30, 2, 8, 16, 24
    c = _case(n=n, k=k, e=e, d=d, f=f, assign="some_empty", seed=4)
    args = (c["x"], c["weights"], c["gate"], c["up"], c["down"])
    rng = np.random.default_rng(5)
    tangents = [jnp.asarray(rng.standard_normal((3, *a.shape)), jnp.float32) for a in args]

    def jvps(fn):
        def out(x, w, a, b, dn):
            y = fn(x, c["experts"], w, a, b, dn)
            return y[0] if isinstance(y, tuple) else y
        return jax.jit(jax.vmap(lambda *t: jax.jvp(out, args, t)[1]))(*tangents)

    got = jvps(lambda *a: moe.expert_ffn_blocks(*a, 8))
    want = jvps(_dense_reference)
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blocks_dispatch_many_small_experts():
    """30 rows over 8 experts with blocks of (32, 16): every expert's rows fit one tail
    block of 16, so there are more tail blocks (8) than 30 / 16 rows would suggest."""
    c = _case(n=10, k=3, e=8, d=16, f=24, assign="random", seed=6)
    args = (c["x"], c["experts"], c["weights"], c["gate"], c["up"], c["down"])
    y, _ = jax.jit(lambda *a: moe.expert_ffn_blocks(*a, 16, levels=1))(*args)
    np.testing.assert_allclose(y, _np_reference(*args), atol=1e-5, rtol=1e-5)
    loss = lambda fn: lambda x, g: jnp.sum(fn(x, c["experts"], c["weights"], g, c["up"], c["down"]))
    got = jax.jit(jax.grad(loss(lambda *a: moe.expert_ffn_blocks(*a, 16, levels=1)[0]), (0, 1)))(
        c["x"], c["gate"])
    want = jax.jit(jax.grad(loss(_dense_reference), (0, 1)))(c["x"], c["gate"])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


# Grouped matmul dispatch (the GPU path; its Pallas kernels interpreted here) -----------------

_grouped = jax.jit(moe.expert_ffn_grouped, static_argnums=(6, 7))


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
@pytest.mark.parametrize("assign", ["random", "some_empty", "one_takes_all"])
def test_grouped_dispatch_equals_dense_reference(assign, impl):
    c = _case(n=37, k=2, e=8, d=16, f=32, assign=assign)
    args = (c["x"], c["experts"], c["weights"], c["gate"], c["up"], c["down"])
    got, load = _grouped(*args, 16, impl)
    np.testing.assert_allclose(got, _np_reference(*args), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(load, np.bincount(np.asarray(c["experts"]).ravel(), minlength=8))


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_grouped_dispatch_gradients_equal_dense_reference(impl):
    c = _case(n=21, k=2, e=8, d=16, f=32, assign="some_empty", seed=1)
    names = ("x", "weights", "gate", "up", "down")
    cot = jax.random.normal(jax.random.key(0), c["x"].shape)

    def loss(fn):
        def f(*diff):
            y = fn(diff[0], c["experts"], *diff[1:])
            return jnp.sum((y[0] if isinstance(y, tuple) else y) * cot)
        return f

    diff = [c[n] for n in names]
    want = jax.jit(jax.grad(loss(_dense_reference), tuple(range(5))))(*diff)
    got = jax.jit(jax.grad(loss(lambda *a: moe.expert_ffn_grouped(*a, 16, impl)), tuple(range(5))))(*diff)
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.all(np.asarray(got[2])[[0, 2, 5]] == 0)  # experts without tokens: zero gradient


def test_grouped_matmul_t_sums_each_experts_blocks():
    """dw[j] = sum of x_b^T dy_b over expert j's blocks, unused (-1) blocks left out, by
    numpy; both implementations."""
    from r1jax.model import grouped_matmul as gmm
    rng = np.random.default_rng(3)
    rows, blocks, e = 16, 6, 4
    x = rng.standard_normal((rows * blocks, 32)).astype(np.float32)
    dy = rng.standard_normal((rows * blocks, 48)).astype(np.float32)
    block_expert = np.array([0, 0, 2, 3, -1, -1], np.int32)
    want = np.zeros((e, 32, 48), np.float32)
    for b, j in enumerate(block_expert):
        if j >= 0:
            want[j] += x[b * rows:(b + 1) * rows].T @ dy[b * rows:(b + 1) * rows]
    for impl in ("xla", "pallas_interpret"):
        got = gmm.grouped_matmul_t(jnp.asarray(x), jnp.asarray(dy), jnp.asarray(block_expert), e, impl)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="not a multiple"):
        gmm.grouped_matmul(jnp.asarray(x[:-1]), jnp.zeros((e, 32, 48)), jnp.asarray(block_expert))


def test_grouped_matmul_kernels_lower_to_triton(monkeypatch):
    """The Pallas kernels (forward, and both products of the backward pass) lower for CUDA
    to Triton modules that verify, checked here without a GPU by exporting for the 'cuda'
    platform. (An unverified module only fails on the GPU: a select of integer literals
    once lowered to booleans as a loop bound.)"""
    from jax import export
    from jax._src.pallas.triton import lowering  # private: the module before serialisation
    from r1jax.model import grouped_matmul as gmm
    verified = []
    real_lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = real_lower(*args, **kwargs)
        verified.append(result.module.operation.verify())
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    x = jax.ShapeDtypeStruct((7 * 64, 128), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4, 128, 96), jnp.bfloat16)
    block_expert = jax.ShapeDtypeStruct((7,), jnp.int32)

    def grads(x, w, block_expert):
        out = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, block_expert, "pallas").astype(jnp.float32) ** 2)
        return jax.grad(out, (0, 1))(x, w)

    triton = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(triton)])(x, w, block_expert)
    text = exported.mlir_module()
    kernels = [name for name in ("r1jax_grouped_matmul", "r1jax_grouped_matmul_t")
               if f'name = "{name}"' in text]
    assert text.count(f"@{triton}") == 3 and len(kernels) == 2, kernels
    assert verified == [True] * 3


def test_moe_matmul_resolves_by_backend(monkeypatch):
    cfg = _cfg(hidden_size=64, moe_intermediate_size=32)
    for backend, want in (("cpu", ("blocks", "xla")), ("gpu", ("grouped", "pallas")),
                          ("tpu", ("ragged_dot", "xla"))):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert moe.resolve_moe_matmul(cfg) == want, backend
        assert moe.resolve_moe_matmul(cfg.replace(moe_matmul="blocks"))[0] == "blocks"
    # on GPU, shapes the kernels don't take fall back to the XLA grouped matmul
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert moe.resolve_moe_matmul(_cfg(hidden_size=40, moe_intermediate_size=24)) == ("grouped", "xla")
