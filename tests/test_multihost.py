"""Two processes on localhost (2 simulated CPU devices each, Gloo collectives) run GRPO
steps on one 4-device mesh through `examples/multihost_worker.py`: each feeds only its rows
of the global batch, both report the same losses, those equal a single-process run of the
same global batch on 4 devices, and a checkpoint written by both restores and resumes."""
import json
import os
import pathlib
import socket
import subprocess
import sys

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


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, str(ROOT / "examples" / "multihost_worker.py"),
               "--coordinator", f"localhost:{port}", "--num-processes", "2",
               "--process-id", str(pid),
               "--mesh", MESH, "--steps", str(STEPS), "--checkpoint-dir", str(tmp / "ckpt"),
               "--out", str(tmp / f"p{pid}.json")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
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
        assert p.returncode == 0, f"process {pid} failed:\n{log[-4000:]}"
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
