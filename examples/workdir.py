"""What every example script does with its work directory: metrics, plots, resume, hosts.

Kept apart from the training loops so each script reads top to bottom as its loop.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from typing import Iterable, Optional


def add_host_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for multi-host runs (JAX's multi-controller runtime)."""
    g = parser.add_argument_group("hosts")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host runs)")
    g.add_argument("--num-processes", type=int, default=1)
    g.add_argument("--process-id", type=int, default=0)


def init_hosts(args) -> None:
    """`jax.distributed.initialize` when the run spans several processes."""
    if args.num_processes > 1:
        import jax

        if args.coordinator is None:
            raise SystemExit("--num-processes > 1 needs --coordinator host:port")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


class MetricsFile:
    """Appends one JSON object per line; `read()` returns them (for plots and resume)."""

    def __init__(self, path: os.PathLike, truncate_after_step: Optional[int] = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # a resumed run rewrites the steps after its checkpoint
            kept = [r for r in self.read() if r.get("step", -1) <= truncate_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v)
                 for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
        return records


def plot_curves(records: list[dict], keys: Iterable[str], path: os.PathLike, title: str,
                hlines: Optional[dict] = None) -> None:
    """One panel per metric against `step`; `hlines` {key: {label: value}} adds reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.5)
        for label, value in (hlines or {}).get(key, {}).items():
            ax.axhline(value, ls="--", lw=1, color="gray")
            ax.annotate(label, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
