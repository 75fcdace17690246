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


@functools.lru_cache(maxsize=None)
def tiny_moe():
    """tiny_moe() (MLA + MoE + MTP) with `init_params(key(0))`."""
    cfg = r1jax.configs.tiny_moe()
    return cfg, r1jax.init_params(jax.random.key(0), cfg)


@functools.lru_cache(maxsize=None)
def tiny_dense():
    """tiny_dense() (Qwen2-shaped GQA, tied embeddings) with `init_params(key(0))`."""
    cfg = r1jax.configs.tiny_dense()
    return cfg, r1jax.init_params(jax.random.key(0), cfg)


def random_tokens(seed: int, shape=(B, T), vocab: int = 256) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, size=shape), jnp.int32)


def distinct_tokens(seed: int, shape=(B, T), vocab: int = 256) -> jax.Array:
    """Tokens that never repeat within a row (and avoid 0, the MTP padding token), so a
    gradient with respect to an embedding row is the gradient with respect to one
    position's input."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.arange(2, vocab))[:shape[1]] for _ in range(shape[0])]
    return jnp.asarray(np.stack(rows), jnp.int32)


def layer(stack, i: int):
    """Layer i of a stacked BlockWeights."""
    return jax.tree.map(lambda a: a[i], stack)


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
