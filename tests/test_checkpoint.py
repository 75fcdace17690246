"""Tests for r1jax.checkpoint: round trips into shardings, retention, crash safety, errors,
and bit-identical resume of a small training loop."""
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax import checkpoint as ck

REPO = pathlib.Path(__file__).resolve().parents[1]

# When one array of a corrupt checkpoint fails to read, orbax leaves the reads of the other
# arrays un-awaited; Python reports that (at garbage collection, maybe in a later test).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def _params(scale=1.0):
    return {
        "embed": scale * jax.random.normal(jax.random.key(0), (64, 32)),  # incompressible
        "moe": {"router_bias": scale * jnp.arange(8, dtype=jnp.float32)},
        "norm": jnp.ones((32,), jnp.bfloat16),
    }


def _state(scale=1.0, step=0, key=None):
    params = _params(scale)
    opt_state = optax.adamw(1e-3).init(params)
    # Make the optimiser moments non-trivial so a wrong restore cannot pass by accident.
    opt_state = jax.tree.map(lambda x: x + scale if x.dtype == jnp.float32 else x, opt_state)
    rng = jax.random.key(int(scale * 10)) if key is None else key
    return TrainState(params, opt_state, jnp.int32(step), rng)


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))


def _spec(x):
    return P("fsdp", "tensor") if getattr(x, "ndim", 0) == 2 else P()


def _abstract(state, mesh):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, _spec(x))),
        state)


def _assert_tree_equal(a, b):
    a = jax.tree.map(lambda x: jax.random.key_data(x) if ck._is_typed_key(x) else x, a)
    b = jax.tree.map(lambda x: jax.random.key_data(x) if ck._is_typed_key(x) else x, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def open_handles():
    """Closes every handle a test opened, even when it fails."""
    handles = []

    def _open(*args, **kwargs):
        handle = ck.open_checkpoints(*args, **kwargs)
        handles.append(handle)
        return handle

    yield _open
    for handle in handles:
        ck.close(handle)


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------


def test_restore_unsharded_save_into_sharded_abstract_target(tmp_path, open_handles):
    state = _state(scale=2.0, step=5)
    handle = open_handles(tmp_path / "ckpt")
    assert ck.latest_step(handle) is None
    assert ck.save(handle, 5, state, {"epoch": 1, "index": np.int64(42), "config": "tiny"})
    ck.wait(handle)
    assert ck.latest_step(handle) == 5

    mesh = _mesh()
    target = _abstract(state, mesh)
    restored, meta = ck.restore(handle, target)

    assert meta == {"epoch": 1, "index": 42, "config": "tiny"}
    assert isinstance(restored, TrainState)
    _assert_tree_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert restored.params["embed"].sharding.spec == P("fsdp", "tensor")
    assert restored.opt_state[0].mu["embed"].sharding.spec == P("fsdp", "tensor")
    # The typed key comes back typed, with the target's sharding, and still usable.
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert restored.rng.sharding == target.rng.sharding
    np.testing.assert_array_equal(jax.random.normal(restored.rng, (3,)),
                                  jax.random.normal(state.rng, (3,)))
    assert restored.params["norm"].dtype == jnp.bfloat16


def test_restore_into_concrete_example_state_and_raw_keys(tmp_path, open_handles):
    saved = _state(scale=3.0, step=9)
    handle = open_handles(tmp_path)
    ck.save(handle, 9, saved, {"index": 9})

    mesh = _mesh()
    example = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, _spec(x))),
                           _state(scale=0.5))
    restored, meta = ck.restore(handle, example)  # waits for the async save itself
    assert meta == {"index": 9}
    _assert_tree_equal(restored, saved)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(example)):
        assert got.sharding == want.sharding

    # A typed key saved can be restored as raw uint32 key data, and the reverse.
    raw_target = dataclasses.replace(saved, rng=jax.random.key_data(saved.rng))
    restored_raw, _ = ck.restore(handle, raw_target)
    assert restored_raw.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(restored_raw.rng, jax.random.key_data(saved.rng))

    ck.save(handle, 10, raw_target)
    restored_typed, meta = ck.restore(handle, saved)
    assert meta == {}
    assert jax.dtypes.issubdtype(restored_typed.rng.dtype, jax.dtypes.prng_key)
    _assert_tree_equal(restored_typed, saved)


def test_numpy_and_python_leaves_round_trip(tmp_path, open_handles):
    handle = open_handles(tmp_path, async_save=False)
    state = {"w": jnp.ones((4,)), "hist": np.arange(5, dtype=np.int64), "lr": 0.5, "n": 3}
    ck.save(handle, 1, state)
    restored, _ = ck.restore(handle, {"w": jnp.zeros((4,)), "hist": np.zeros(5, np.int64),
                                      "lr": 0.0, "n": 0})
    assert isinstance(restored["hist"], np.ndarray)
    np.testing.assert_array_equal(restored["hist"], np.arange(5))
    assert restored["lr"] == 0.5 and restored["n"] == 3


def test_async_save_copies_arrays_before_returning(tmp_path, open_handles):
    handle = open_handles(tmp_path, async_save=True)
    state = {"w": jnp.full((256, 256), 7.0)}
    assert ck.save(handle, 1, state, {"index": 1})
    state["w"].delete()  # e.g. donated to the next train step
    ck.wait(handle)
    restored, _ = ck.restore(handle, {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)})
    np.testing.assert_array_equal(restored["w"], 7.0)


def test_keeps_last_n_and_respects_save_interval(tmp_path, open_handles):
    handle = open_handles(tmp_path, max_to_keep=2, save_interval_steps=2)
    state = {"w": jnp.zeros((3,))}
    started = [ck.save(handle, s, {"w": state["w"] + s}, {"index": s}) for s in range(1, 8)]
    assert started == [False, True, False, True, False, True, False]
    assert ck.save(handle, 7, {"w": state["w"] + 7}, {"index": 7}, force=True)
    ck.wait(handle)
    assert ck.all_steps(handle) == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]
    restored, meta = ck.restore(handle, state, step=6)
    np.testing.assert_array_equal(restored["w"], 6.0)
    assert meta == {"index": 6}
    assert ck.save(handle, 5, state) is False  # not newer than the latest step


def test_handle_lifecycle(tmp_path):
    with ck.open_checkpoints(tmp_path) as handle:
        ck.save(handle, 1, {"w": jnp.ones(2)})
    assert handle.closed
    ck.close(handle)  # idempotent
    with pytest.raises(ck.CheckpointError, match="closed"):
        ck.latest_step(handle)
    reader = ck.open_checkpoints(tmp_path, read_only=True)
    try:
        assert ck.latest_step(reader) == 1
        with pytest.raises(ck.CheckpointError, match="read-only"):
            ck.save(reader, 2, {"w": jnp.ones(2)})
    finally:
        ck.close(reader)


# ----------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------


def test_metadata_must_be_json(tmp_path, open_handles):
    handle = open_handles(tmp_path)
    with pytest.raises(TypeError, match=r"metadata for step 3 must be JSON-serialisable"):
        ck.save(handle, 3, {"w": jnp.ones(2)}, {"bad": object()})
    with pytest.raises(TypeError, match="must be a dict"):
        ck.save(handle, 3, {"w": jnp.ones(2)}, [1, 2])
    assert ck.all_steps(handle) == []


def test_restore_from_missing_or_empty_directory(tmp_path, open_handles):
    missing = tmp_path / "does-not-exist"
    handle = open_handles(missing)
    with pytest.raises(ck.CheckpointNotFoundError, match="no checkpoint found") as err:
        ck.restore(handle, {"w": jnp.ones(2)})
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert not missing.exists()  # opening does not create the directory

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / f"4{ck._TMP_SUFFIX}").mkdir()  # an uncommitted save only
    reader = open_handles(empty, read_only=True)
    with pytest.raises(ck.CheckpointNotFoundError, match="no checkpoint found") as err:
        ck.restore(reader, {"w": jnp.ones(2)})
    assert str(empty) in str(err.value) and "uncommitted" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)

    writer = open_handles(tmp_path / "w")
    ck.save(writer, 1, {"w": jnp.ones(2)})
    with pytest.raises(ck.CheckpointNotFoundError, match=r"step 2 .*committed steps: \[1\]"):
        ck.restore(writer, {"w": jnp.ones(2)}, step=2)


def test_structure_mismatch_names_key_path_shapes_and_dtypes(tmp_path, open_handles):
    state = _state(step=1)
    handle = open_handles(tmp_path)
    ck.save(handle, 1, state)
    params = dict(state.params)

    wrong_shape = dataclasses.replace(state, params={**params, "embed": jnp.zeros((32, 32))})
    with pytest.raises(ck.CheckpointMismatchError) as err:
        ck.restore(handle, wrong_shape)
    msg = str(err.value)
    assert str(tmp_path / "1") in msg
    assert ".params['embed']" in msg and "(32, 32)" in msg and "(64, 32)" in msg

    wrong_dtype = dataclasses.replace(
        state, params={**params, "norm": jax.ShapeDtypeStruct((32,), jnp.float32)})
    with pytest.raises(ck.CheckpointMismatchError,
                       match=r"\.params\['norm'\].*float32.*bfloat16"):
        ck.restore(handle, wrong_dtype)

    extra = dataclasses.replace(state, params={**params, "lm_head": jnp.zeros((4,))})
    with pytest.raises(ck.CheckpointMismatchError,
                       match=r"\.params\['lm_head'\] is in the target but not in the checkpoint"):
        ck.restore(handle, extra)

    missing = dataclasses.replace(state, params={k: v for k, v in params.items() if k != "moe"})
    with pytest.raises(ck.CheckpointMismatchError,
                       match="params/moe/router_bias is in the checkpoint"):
        ck.restore(handle, missing)

    other_key = dataclasses.replace(state, rng=jax.random.key(0, impl="rbg"))
    with pytest.raises(ck.CheckpointMismatchError, match=r"\.rng .*key<rbg>"):
        ck.restore(handle, other_key)


# ----------------------------------------------------------------------------------------
# Crash safety
# ----------------------------------------------------------------------------------------


def test_uncommitted_tmp_dir_is_ignored_and_cleaned(tmp_path, open_handles):
    writer = open_handles(tmp_path)
    ck.save(writer, 1, {"w": jnp.ones(4)}, {"index": 1})
    ck.close(writer)
    # What a kill during the write of step 2 leaves behind.
    tmp = tmp_path / f"2{ck._TMP_SUFFIX}"
    (tmp / "state" / "d").mkdir(parents=True)
    (tmp / "state" / "d" / "deadbeef").write_bytes(b"\x00" * 100)

    reader = open_handles(tmp_path, read_only=True)
    assert ck.all_steps(reader) == [1]
    assert tmp.exists()  # read-only handles never delete

    handle = open_handles(tmp_path)
    assert not tmp.exists()
    restored, meta = ck.restore(handle, {"w": jnp.zeros(4)})
    np.testing.assert_array_equal(restored["w"], 1.0)
    assert meta == {"index": 1}
    assert ck.save(handle, 2, {"w": jnp.full(4, 2.0)}, {"index": 2})
    restored, meta = ck.restore(handle, {"w": jnp.zeros(4)})
    np.testing.assert_array_equal(restored["w"], 2.0)
    assert meta == {"index": 2}


_KILLED_WRITER = textwrap.dedent("""
    import asyncio, pathlib, sys, time
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from r1jax import checkpoint as ck

    directory, flag, where = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    handle = ck.open_checkpoints(directory, async_save=True)
    ck.save(handle, 1, {{"w": jnp.full((64, 64), 1.0)}}, {{"index": 1}})
    ck.wait(handle)

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_then_hang(self):
        name = self.get_final().name
        if (where == "step" and name.isdigit()) or (where == "item" and name == "state"):
            flag.write_text("written")  # everything before this commit point is on disk
            await asyncio.sleep(3600)   # ... and the parent kills us here
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_hang
    ck.save(handle, 2, {{"w": jnp.full((64, 64), 2.0)}}, {{"index": 2}})
    time.sleep(3600)
""")


@pytest.mark.parametrize("where", ["item", "step"])
def test_sigkill_during_save_resumes_from_last_complete_step(tmp_path, open_handles, where):
    directory, flag = tmp_path / "ckpt", tmp_path / "flag"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER.format(repo=str(REPO)), str(directory), str(flag),
         where], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "writer subprocess never reached the commit"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in directory.iterdir()]
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith(f"2{ck._TMP_SUFFIX}") for name in leftovers), leftovers

    handle = open_handles(directory)
    assert ck.latest_step(handle) == 1
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    restored, meta = ck.restore(handle, target)
    np.testing.assert_array_equal(restored["w"], 1.0)
    assert meta == {"index": 1}
    assert ck.save(handle, 2, {"w": jnp.full((64, 64), 2.0)}, {"index": 2})
    restored, meta = ck.restore(handle, target)
    np.testing.assert_array_equal(restored["w"], 2.0)
    assert meta == {"index": 2}
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def test_unclosed_handle_commits_its_last_save_at_exit(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import jax.numpy as jnp
        from r1jax import checkpoint as ck
        handle = ck.open_checkpoints(sys.argv[1], async_save=True)
        ck.save(handle, 1, {{"w": jnp.ones((1000, 1000))}}, {{"index": 1}})
        ck.save(handle, 2, {{"w": jnp.full((2000, 2000), 2.0)}}, {{"index": 2}})
        # no close(): the exit hook must wait for step 2 to commit
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    with ck.open_checkpoints(tmp_path, read_only=True) as handle:
        restored, meta = ck.restore(handle, {"w": jax.ShapeDtypeStruct((2000, 2000), jnp.float32)})
    assert meta == {"index": 2}
    np.testing.assert_array_equal(restored["w"], 2.0)


def _largest_data_file(step_dir):
    """The chunk file of the largest array (tests store incompressible arrays)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncate_data", "remove_data", "remove_metadata"])
def test_corrupt_step_raises_or_falls_back(tmp_path, open_handles, damage):
    handle = open_handles(tmp_path, max_to_keep=3)
    for step in (1, 2, 3):
        ck.save(handle, step, _state(scale=float(step), step=step), {"index": step})
    ck.close(handle)
    step_dir = tmp_path / "3"
    if damage == "truncate_data":
        _truncate(_largest_data_file(step_dir))
    elif damage == "remove_data":
        _largest_data_file(step_dir).unlink()
    else:
        (step_dir / "metadata" / "metadata").unlink()

    handle = open_handles(tmp_path)
    target = _state()
    with pytest.raises(ck.CheckpointCorruptError, match=f"step 3 at {step_dir}"):
        ck.restore(handle, target, step=3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored, meta = ck.restore(handle, target)
    _assert_tree_equal(restored, _state(scale=2.0, step=2))
    assert meta == {"index": 2}
    # The unreadable step is kept aside, not deleted, and its number can be saved again.
    assert not step_dir.exists()
    quarantined = list(tmp_path.glob("3.corrupt-*"))
    assert len(quarantined) == 1
    messages = [str(w.message) for w in caught if w.category is ck.CheckpointFallbackWarning]
    assert len(messages) == 3, messages
    assert f"step 3 at {step_dir}" in messages[0] and "falling back" in messages[0]
    assert "restored step 2" in messages[1]
    assert "skipping unreadable newer step(s) [3]" in messages[1]
    assert str(quarantined[0]) in messages[2]
    assert ck.latest_step(handle) == 2
    assert ck.save(handle, 3, _state(scale=3.0, step=3), {"index": 3})
    restored, meta = ck.restore(handle, target)
    _assert_tree_equal(restored, _state(scale=3.0, step=3))
    assert meta == {"index": 3}


def test_all_steps_corrupt_raises_clear_error(tmp_path, open_handles):
    handle = open_handles(tmp_path)
    for step in (1, 2):
        ck.save(handle, step, {"w": jax.random.normal(jax.random.key(step), (64, 64))})
    ck.close(handle)
    for step in (1, 2):
        _truncate(_largest_data_file(tmp_path / str(step)))
    handle = open_handles(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ck.CheckpointFallbackWarning)
        with pytest.raises(ck.CheckpointCorruptError,
                           match=f"none of the 2 committed checkpoint.* in {tmp_path}"):
            ck.restore(handle, {"w": jnp.zeros((64, 64))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # nothing moved


# ----------------------------------------------------------------------------------------
# Deterministic resume
# ----------------------------------------------------------------------------------------

_TX = optax.adam(0.05)
_TRUE_W = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)


def _batch(position):
    """A fake data iterator: the batch is a pure function of the iterator position."""
    x = np.random.default_rng(position).normal(size=(16, 4)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(x @ _TRUE_W + 0.1)


def _init_state():
    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
    return TrainState(params, _TX.init(params), jnp.int32(0), jax.random.key(1234))


@jax.jit
def _train_step(state, x, y):
    rng, noise_key = jax.random.split(state.rng)

    def loss_fn(params):
        noise = 0.01 * jax.random.normal(noise_key, y.shape)
        return jnp.mean((x @ params["w"] + params["b"] - y - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = _TX.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, state.step + 1, rng), loss


def _train(state, position, n_steps, handle=None):
    losses = []
    for _ in range(n_steps):
        state, loss = _train_step(state, *_batch(position))
        position += 1
        losses.append(np.asarray(loss))
        if handle is not None:
            ck.save(handle, int(state.step), state, {"data_position": position})
    return state, position, losses


def test_resume_is_bit_identical(tmp_path):
    reference, _, ref_losses = _train(_init_state(), 0, 10)

    with ck.open_checkpoints(tmp_path, max_to_keep=2, save_interval_steps=2) as handle:
        state, position, losses = _train(_init_state(), 0, 7, handle)
    np.testing.assert_array_equal(np.stack(losses), np.stack(ref_losses[:7]))
    del state, position, handle  # "crash" after step 7; step 6 is the latest checkpoint

    with ck.open_checkpoints(tmp_path, max_to_keep=2, save_interval_steps=2) as handle:
        assert ck.all_steps(handle) == [4, 6]
        state, meta = ck.restore(handle, jax.eval_shape(_init_state))
        assert int(state.step) == 6 and meta == {"data_position": 6}
        state, position, losses = _train(state, meta["data_position"], 4, handle)
        assert ck.latest_step(handle) == 10

    assert position == 10 and int(state.step) == 10
    np.testing.assert_array_equal(np.stack(losses), np.stack(ref_losses[6:]))
    _assert_tree_equal(state, reference)
