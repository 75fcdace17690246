"""Two processes on localhost (2 simulated CPU devices each, Gloo collectives) on one
4-device mesh.

1. `examples/multihost_worker.py`: GRPO steps on hand-built batches; each process feeds
   only its rows of the global batch, both report the same losses, those equal a
   single-process run of the same global batch on 4 devices, and a checkpoint written by
   both restores and resumes.
2. `examples/r1_zero.py`, the main example, end to end at toy size: pretraining, evaluation,
   rollouts (each process generates and scores its own prompts), GRPO steps, checkpoints;
   both processes report the same step values; stopped after 2 steps and restarted, it
   resumes from the checkpoint both wrote and continues with step 3; and its steps equal
   those of one process driving the same 4 devices.
"""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
from typing import Callable

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import multihost_worker  # noqa: E402

MESH, STEPS, TIMEOUT = "data=2,fsdp=2", 3, 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, cache_dir=None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if cache_dir is not None:  # a restarted run loads its programs instead of compiling them
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _run_processes(script: str, args: Callable[[int], list], num_processes: int = 2,
                   devices_each: int = 2, cache_dir=None) -> list[str]:
    """Runs `examples/<script>` as `num_processes` processes of one multi-process run on
    localhost (a free port for the coordinator), or as one plain process, with flags
    `args(process_id)`; returns each process's output, after checking that all of them
    succeeded."""
    port = _free_port()
    procs = []
    for pid in range(num_processes):
        hosts = ["--coordinator", f"localhost:{port}", "--num-processes", str(num_processes),
                 "--process-id", str(pid)] if num_processes > 1 else []
        cmd = [sys.executable, str(ROOT / "examples" / script), *hosts, *map(str, args(pid))]
        procs.append(subprocess.Popen(cmd, env=_env(devices_each, cache_dir),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{script} process {pid} failed:\n{log[-4000:]}"
    return logs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    _run_processes("multihost_worker.py", lambda pid: [
        "--mesh", MESH, "--steps", STEPS, "--checkpoint-dir", tmp / "ckpt",
        "--out", tmp / f"p{pid}.json"])
    return [json.loads((tmp / f"p{pid}.json").read_text()) for pid in range(2)]


def test_processes_split_the_batch_and_agree(two_processes):
    p0, p1 = two_processes
    assert (p0["process_index"], p1["process_index"]) == (0, 1)
    assert p0["process_count"] == 2 and p0["devices"] == 4 and p0["local_devices"] == 2
    rows = multihost_worker.ROWS
    assert p0["process_rows"] == [0, rows // 2] and p1["process_rows"] == [rows // 2, rows]
    assert len(p0["losses"]) == STEPS
    assert p0["losses"] == p1["losses"]  # one replicated value, read on each process
    assert p0["grad_norms"] == p1["grad_norms"]
    assert p0["checksum_final"] == p1["checksum_final"]


def test_equals_single_process(two_processes):
    single = multihost_worker.run(MESH, STEPS, devices=jax.devices()[:4])
    assert single["process_rows"] == [0, multihost_worker.ROWS]
    assert min(abs(x) for x in single["losses"]) > 1e-3  # a loss that depends on the parameters
    np.testing.assert_allclose(two_processes[0]["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(two_processes[0]["grad_norms"], single["grad_norms"], rtol=1e-5)
    np.testing.assert_allclose(two_processes[0]["checksum_final"], single["checksum_final"],
                               rtol=1e-5)


def test_checkpoint_written_and_restored_by_both(two_processes):
    for p in two_processes:
        assert p["checksum_restored"] == p["checksum_saved"]
        assert p["restored_step"] == STEPS - 1
        # resuming from the checkpoint repeats the last step exactly
        assert p["resumed_loss"] == p["losses"][-1]
        assert p["resumed_checksum"] == p["checksum_final"]


# r1_zero.py across two processes -----------------------------------------------------------------

R1_ZERO_MESH = "fsdp=4"  # parameters sharded over both processes' devices, so are checkpoints
# the toy run of tests/test_examples.py; 2 prompts x G = 2 and 4 held-out problems: one row
# per device (each process generates and scores one prompt's group, evaluates 2 problems)
R1_ZERO_FLAGS = ["--toy-model", "dense", "--pretrain-steps", "2", "--num-prompts", "2",
                 "--num-generations", "2", "--num-eval", "4", "--eval-samples", "1",
                 "--max-new-tokens", "8", "--num-train", "200", "--checkpoint-every", "1",
                 "--quiet", "--mesh", R1_ZERO_MESH]


def _step_records(log: str, process_id: int) -> list[dict]:
    """The `process <i> {...}` lines r1_zero.py prints per step in a multi-process run."""
    found = [(int(m.group(1)), json.loads(m.group(2)))
             for m in re.finditer(r"^process (\d+) (\{.*\})$", log, re.MULTILINE)]
    assert all(i == process_id for i, _ in found), f"lines of another process in {process_id}'s log"
    return [record for _, record in found]


@pytest.fixture(scope="module")
def r1_zero_two_processes(tmp_path_factory):
    """r1_zero.py on 2 processes: 2 steps, then restarted with --steps 3 (resumes)."""
    tmp = tmp_path_factory.mktemp("r1_zero_2p")
    workdir = tmp / "run"
    runs = []
    for steps in (2, 3):
        logs = _run_processes("r1_zero.py", lambda pid: [
            "--workdir", workdir, "--steps", steps, *R1_ZERO_FLAGS], cache_dir=tmp / "xla_cache")
        runs.append([_step_records(log, pid) for pid, log in enumerate(logs)])
    return workdir, runs


def test_r1_zero_processes_agree_and_resume(r1_zero_two_processes):
    workdir, (first, resumed) = r1_zero_two_processes
    p0, p1 = first
    assert [r["step"] for r in p0] == [1, 2]
    # every step value is a global one, the same on both processes: loss, KL, entropy, and
    # the reward / length means over all completions (each process scores its own)
    assert p0 == p1
    assert all(r["entropy"] > 0 and r["mean_length"] > 0 for r in p0)
    # restarted with --steps 3: restored from step 2's checkpoint, only step 3 runs
    assert [r["step"] for r in resumed[0]] == [3]
    assert resumed[0] == resumed[1]
    # metrics come from process 0 alone (no line twice); checkpoints from both together
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records == p0 + resumed[0]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_problems"] == 4


def test_r1_zero_two_processes_equal_one(r1_zero_two_processes, tmp_path):
    """One process driving the same 4-device mesh takes the same steps: the processes
    together generated for, scored and trained on the whole batch, each prompt once."""
    _, (first, _) = r1_zero_two_processes
    _run_processes("r1_zero.py", lambda pid: [
        "--workdir", tmp_path, "--steps", 2, *R1_ZERO_FLAGS], num_processes=1, devices_each=4)
    single = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in single] == [1, 2]
    for one, two in zip(single, first[0]):
        assert one.keys() == two.keys()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
