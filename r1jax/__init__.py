"""r1jax: DeepSeek-R1-style reasoning models in JAX, as pure functions over pytrees."""
from r1jax import configs
from r1jax.configs import ModelConfig
from r1jax.convert import CheckpointError, load_hf, save_hf
from r1jax.model.cache import KVCache, init_cache
from r1jax.model.transformer import (ModelOutput, Params, abstract_params, forward, init_params,
                                     param_count)
from r1jax.sharding import MeshRules, ShardingRules, make_mesh

__all__ = [
    "configs", "ModelConfig", "CheckpointError", "load_hf", "save_hf", "KVCache", "init_cache",
    "ModelOutput", "Params", "abstract_params", "forward", "init_params", "param_count",
    "MeshRules", "ShardingRules", "make_mesh",
]
