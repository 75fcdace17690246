"""Shared, cached inputs for the model-foundation tests (parity, model, moe, convert).

Plain cached functions rather than pytest fixtures, so that every test module in one
pytest process shares the same loaded fixture folders and random parameters (a pytest
fixture imported into two modules is two fixtures with two caches).

Random init is the expensive part on CPU (XLA compiles one threefry normal per weight),
so each (config, key) is initialised once per process.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import r1jax

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
DEEPSEEK_FIXTURES = ("deepseek_v3_yarn", "deepseek_v3_noqlora")
ALL_FIXTURES = ("qwen2_tied", "deepseek_v3_yarn", "deepseek_v3_noqlora", "deepseek_v3_fp8")

# The standard test batch: every property test on a random model uses this shape where it
# can, so `forward` compiles few shapes.
B, T = 2, 12


@functools.lru_cache(maxsize=None)
def fixture(name: str):
    """(cfg, float32 params, dict of fixture.npz arrays) for one folder under fixtures/hf."""
    path = FIXTURES / name
    cfg, params = r1jax.load_hf(path)
    data = dict(np.load(path / "fixture.npz"))
    return cfg, params, data


def random_params(cfg, seed: int, with_mtp: bool = True):
    """Parameters drawn with numpy the way the HF fixtures were (README): every matrix
    normal with std 1/sqrt(fan_in), norm gains 1 + 0.2 * normal, q/k/v biases 0.3 *
    normal, router correction bias 0.15 * normal, so every part of the model matters.

    Used instead of `init_params` for the MoE model's property tests: `init_params`
    compiles one threefry normal per weight, about 25 s for tiny_moe on 2 CPU cores, and
    its gains of one and zero router bias exercise less. `init_params` itself is tested
    on tiny_dense (values) and by `eval_shape` (structure)."""
    from r1jax import sharding as shd
    from r1jax.model import transformer
    rng = np.random.default_rng(seed)
    infos = transformer.param_infos(cfg, with_mtp=with_mtp)

    def draw(path, info):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        dims = [n for n, ax in zip(info.shape, info.logical_axes)
                if ax not in ("layers", "experts")]
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("norm"):
            x = 1 + 0.2 * rng.standard_normal(info.shape)
        elif leaf == "router_bias":
            x = 0.15 * rng.standard_normal(info.shape)
        elif leaf.endswith("_bias"):
            x = 0.3 * rng.standard_normal(info.shape)
        elif leaf == "embed":
            x = rng.standard_normal(info.shape) * (2 * cfg.hidden_size ** -0.5
                                                   if cfg.tie_word_embeddings else 1.0)
        else:
            fan_in = int(np.prod(dims[:2])) if name.endswith("attn.o") else dims[0]
            x = rng.standard_normal(info.shape) * fan_in ** -0.5
        return jnp.asarray(x, info.dtype)

    return jax.tree_util.tree_map_with_path(draw, infos, is_leaf=shd.is_info)


@functools.lru_cache(maxsize=None)
def tiny_moe():
    """tiny_moe() (MLA + MoE + MTP) with `random_params` (see there)."""
    cfg = r1jax.configs.tiny_moe()
    return cfg, random_params(cfg, 0)


@functools.lru_cache(maxsize=None)
def _dense_init_fn():
    # init_params jits a fresh closure per call, so every call recompiles (~5 s here);
    # under one outer jit, calls with different keys share one compilation.
    cfg = r1jax.configs.tiny_dense()
    return jax.jit(lambda key: r1jax.init_params(key, cfg))


def dense_init(key):
    """`init_params(key, tiny_dense())`, compiled once per process."""
    return _dense_init_fn()(key)


@functools.lru_cache(maxsize=None)
def tiny_dense():
    """tiny_dense() (Qwen2-shaped GQA, tied embeddings) with `init_params(key(0))`."""
    return r1jax.configs.tiny_dense(), dense_init(jax.random.key(0))


def random_tokens(seed: int, shape=(B, T), vocab: int = 256) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, size=shape), jnp.int32)


def distinct_tokens(seed: int, shape=(B, T), vocab: int = 256) -> jax.Array:
    """Tokens that never repeat in the batch (and avoid 0, the MTP padding token), so a
    derivative with respect to an embedding-table row is one with respect to one
    position's input."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(2, vocab))[:int(np.prod(shape))]
    return jnp.asarray(ids.reshape(shape), jnp.int32)


def layer(stack, i: int):
    """Layer i of a stacked BlockWeights."""
    return jax.tree.map(lambda a: a[i], stack)


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
