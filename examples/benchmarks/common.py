"""What every benchmark in this folder shares: this machine's limits, timing, and the record.

The limits are measured in the same run as the thing they judge, because on a shared
or throttled machine yesterday's peak is not today's:

- `matmul_peak`: float32 FLOP/s of one large square `jnp.matmul` in JAX (best of a few);
- `memory_bandwidth`: bytes/s of a `jnp.sum` over a large float32 array (read-only
  streaming, best of a few), the bound a memory-bound decode step runs into.

`time_floor(flops, bytes)` is then `max(flops / peak, bytes / bandwidth)`, and a
benchmark's "limit fraction" is `time_floor / measured time` (1.0 = at the machine's limit).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Limits:
    """FLOP/s of a float32 matmul and bytes/s of a streaming reduction, both measured now."""

    matmul_flops: float
    bandwidth_bytes: float
    matmul_size: int
    bandwidth_mbytes: int
    dot_stream_bytes: float = float("nan")  # informational: see dot_stream_bandwidth

    def time_floor(self, flops: float, nbytes: float) -> float:
        """Seconds the machine needs at least: the slower of compute and memory traffic."""
        return max(flops / self.matmul_flops, nbytes / self.bandwidth_bytes)

    def as_dict(self) -> dict:
        return {"matmul_gflops": self.matmul_flops / 1e9, "bandwidth_gbytes": self.bandwidth_bytes / 1e9,
                "matmul_size": self.matmul_size, "bandwidth_mbytes": self.bandwidth_mbytes,
                "dot_stream_gbytes": self.dot_stream_bytes / 1e9}


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Smallest wall time of `repeats` calls of fn (after one warm-up), blocking on results."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(median, all) wall times of `repeats` calls of fn, blocking on JAX results; no warm-up
    here: call fn once yourself first so compilation is not timed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of a [size, size] @ [size, size] matmul in JAX, best of `repeats`."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return 2.0 * size ** 3 / best_time(lambda: matmul(a, b), repeats)


def memory_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s read by a float32 `jnp.sum` over an array of `mbytes` MiB, best of `repeats`."""
    x = jnp.ones((mbytes * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / best_time(lambda: total(x), repeats)


def dot_stream_bandwidth(rows: int = 8, mbytes: int = 144, repeats: int = 3) -> float:
    """Weight bytes/s of a chain of [rows, 512] x [512, 1536] float32 matmuls whose weights
    (`mbytes` MiB in all) do not fit in cache: what a decode step's projections can stream.
    Informational (not part of the time floor): on 2 cores it is about half of
    `memory_bandwidth`, for XLA and for PyTorch alike."""
    count = max(1, mbytes * 2 ** 20 // (512 * 1536 * 4))
    weights = [jnp.full((512, 1536), 1e-3 * (i + 1), jnp.float32) for i in range(count)]
    x = jnp.ones((rows, 512), jnp.float32)

    @jax.jit
    def chain(x, weights):
        total = jnp.zeros((rows, 1536), jnp.float32)
        for w in weights:  # independent products: only the weight traffic is timed
            total = total + x @ w
        return total

    return count * 512 * 1536 * 4 / best_time(lambda: chain(x, weights), repeats)


def measure_limits(quick: bool = False) -> Limits:
    size, mbytes = (256, 16) if quick else (2048, 512)
    return Limits(matmul_peak(size), memory_bandwidth(mbytes), size, mbytes,
                  dot_stream_bandwidth(mbytes=8 if quick else 144))


def add_malloc_flag(group) -> None:
    group.add_argument("--default-malloc", action="store_true",
                       help="leave glibc's malloc policy as it is, in r1jax's process and the peer's "
                            "(by default both keep freed memory for reuse: r1jax.host_memory)")


def apply_malloc_policy(args) -> bool:
    """Before any JAX work: `r1jax.host_memory.retain_freed_memory()` unless
    --default-malloc; whether it applied (the peers get `--retain-freed-memory` then)."""
    from r1jax.host_memory import retain_freed_memory

    return False if args.default_malloc else retain_freed_memory()


def peer_malloc_args(args) -> list[str]:
    """The peer's command-line flag for the malloc policy `apply_malloc_policy` applied."""
    return ["--retain-freed-memory"] if args.retained_freed_memory else []


def load_average() -> float:
    """The 1-minute load average (other work on this machine skews every number)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine() -> dict:
    """What ran the benchmark: CPU, cores, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import r1jax

    info = {"cpu": cpu, "cores": os.cpu_count(), "r1jax": os.path.dirname(r1jax.__file__),
            "jax": jax.__version__, "numpy": np.__version__,
            "backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for package in ("torch", "transformers"):  # versions only: importing torch here would slow it
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def write_json(path: os.PathLike, record: dict) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain fixed-width table: numbers right-aligned, '-' for missing values."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)

