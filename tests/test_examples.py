"""Each example runs a few steps at toy size; a killed run resumes bit-identically; bad
inputs give clear errors.

Most scripts are called in-process through `main(argv)` / `run(parse_args(argv))`, so
JAX starts once and the jitted sampler is shared; the kill-and-resume test needs real
processes. Everything uses the dense toy model (it compiles faster than the MoE one).
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax import checkpoint as ckpt
from r1jax.data import iterate
from r1jax.data import sft as sft_data
from r1jax.data.tokenizer import CharTokenizer, HFTokenizer
from r1jax.losses import next_token_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import convert_hf  # noqa: E402
import generate  # noqa: E402
import pretrain_tiny  # noqa: E402
import r1_zero  # noqa: E402
import rejection_sample  # noqa: E402
import sft  # noqa: E402

ARITHMETIC = ["--num-train", "200", "--num-test", "4"]  # the r1_zero test's dataset config


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _traces(n=12):
    """Correct worked answers in the short template, as SFT examples."""
    out = []
    for i in range(n):
        doc = pretrain_tiny.corpus_document(i, 1, noise=0.0, template_rate=1.0)
        prompt, completion = doc.split("<think>", 1)
        out.append({"prompt": prompt + "<think>", "completion": completion})
    return out


def _hf_model_with_tokenizer(dst: pathlib.Path, fixtures_dir) -> pathlib.Path:
    """The qwen2_tied fixture plus a character-level tokenizer.json (ids < its vocab of 256)."""
    from tokenizers import Tokenizer, decoders, models

    shutil.copytree(fixtures_dir / "qwen2_tied", dst)
    vocab = {"<s>": 0, "</s>": 1}
    for c in ["\n"] + [chr(i) for i in range(32, 127)]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])
    tok.save(str(dst / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """pretrain_tiny.py, 3 steps, checkpoints every 2: a toy base model for the other tests."""
    workdir = tmp_path_factory.mktemp("pretrain")
    pretrain_tiny.main(["--workdir", str(workdir), "--model", "dense", "--steps", "3",
                        "--batch-size", "8", "--checkpoint-every", "2"])
    return workdir


# The examples -----------------------------------------------------------------------------------

def test_pretrain_tiny(pretrained):
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3]
    assert all(np.isfinite(r["ce"]) for r in records)
    assert (pretrained / "pretrain.png").stat().st_size > 0
    assert sorted(p.name for p in (pretrained / "checkpoints").iterdir()) == ["2", "3"]


@pytest.mark.slow
def test_r1_zero(tmp_path, data_dir):
    # the default beta > 0 keeps a reference model: two steps check it survives the donating step
    args = r1_zero.parse_args([
        "--workdir", str(tmp_path), "--pretrain-steps", "3", "--steps", "2", "--num-prompts", "2",
        "--num-generations", "2", "--num-eval", "4", "--eval-samples", "1", "--max-new-tokens", "8",
        "--num-train", "200", "--toy-model", "dense", "--quiet"])
    summary = r1_zero.run(args)
    saved = json.loads((tmp_path / "summary.json").read_text())
    for result in (saved["before"], saved["after"]):
        for key in ("accuracy", "format_rate", "mean_length"):
            assert 0 <= result[key] <= (8 if key == "mean_length" else 1)
    assert saved["wall_seconds"] > 0 and summary["steps"] == 2
    assert (tmp_path / "r1_zero.png").stat().st_size > 0
    metrics = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in metrics] == [1, 2]
    # its dataset, shared with the rejection-sampling test
    shutil.copytree(tmp_path / "data", data_dir, dirs_exist_ok=True)


def test_sft_from_hf_model_exports_and_generates(tmp_path, fixtures_dir):
    base = _hf_model_with_tokenizer(tmp_path / "base", fixtures_dir)
    answer = "<think>2+2=4</think><answer>4</answer>"
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": answer}]}
    data = _write_jsonl(tmp_path / "traces.jsonl", _traces(6) + ["", chat])  # blank line skipped
    workdir = tmp_path / "run"
    summary = sft.main(["--data", str(data), "--base", str(base), "--workdir", str(workdir),
                        "--steps", "4", "--batch-size", "4", "--seq-len", "56",
                        "--learning-rate", "3e-3", "--checkpoint-every", "2", "--log-every", "1",
                        "--save-hf", str(tmp_path / "hf"), "--quiet"])
    assert summary["examples"] == 7
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["ce"]) and r["target_tokens"] > 0 for r in records)
    assert (workdir / "sft.png").stat().st_size > 0
    assert (workdir / "tokenizer.json").is_file()  # copied, for generate.py --checkpoint

    # the checkpoint stores the model config; the HF export holds the same model
    model = generate.load_checkpoint(workdir)
    assert isinstance(model.tokenizer, HFTokenizer) and model.cfg.model_type == "qwen2"
    cfg, params = r1jax.load_hf(tmp_path / "hf")
    assert cfg == model.cfg
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    results = generate.main(["--checkpoint", str(workdir), "--template", "chat",
                             "--max-new-tokens", "6", "--num-samples", "2", "--temperature", "0",
                             "What is 3+4?"])
    assert len(results) == 2 and results[0]["completion"] == results[1]["completion"]  # greedy
    for r in results:
        assert r["prompt"].endswith("<|im_start|>assistant\n")
        assert 1 <= r["num_tokens"] <= 6 and np.isfinite(r["logprob"]) and r["logprob"] <= 0
        assert r["stop_reason"] in ("stop token", "max_new_tokens")


def test_generate_from_pretrain_checkpoint(tmp_path, pretrained):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl",
                           [{"prompt": "What is 1+2?"}, {"question": "What is 7-3?"}])
    out = tmp_path / "out.jsonl"
    results = generate.main([
        "--checkpoint", str(pretrained / "checkpoints"), "--toy-model", "dense", "--template",
        "short", "--prompts-file", str(prompts), "--max-new-tokens", "8", "--top-k", "5",
        "--temperature", "1.0", "--out", str(out), "--show-tokens", "What is 12+7?"])
    assert [r["prompt"] for r in results] == ["What is 12+7? <think>", "What is 1+2? <think>",
                                              "What is 7-3? <think>"]
    for r in results:
        assert len(r["token_logprobs"]) == r["num_tokens"]
        assert abs(sum(r["token_logprobs"]) - r["logprob"]) < 1e-4
    assert [json.loads(x) for x in out.read_text().splitlines()] == results


def test_rejection_sample(tmp_path, pretrained, data_dir):
    stats = rejection_sample.main([
        "--checkpoint", str(pretrained), "--toy-model", "dense", "--workdir", str(tmp_path),
        "--data-dir", str(data_dir), *ARITHMETIC, "--num-prompts", "3", "--num-generations", "2",
        "--prompts-per-batch", "2", "--max-new-tokens", "8", "--max-per-prompt", "1", "--quiet"])
    assert stats["prompts"] == 3 and stats["samples"] == 6
    assert 0 <= stats["acceptance_rate"] <= stats["accuracy"] <= 1
    lines = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert len(lines) == stats["written"] <= stats["prompts_with_accepted"] <= 3
    assert json.loads((tmp_path / "rejection_stats.json").read_text())["samples"] == 6
    # the scoring and selection rules on known completions
    example = {"answer": "19", "numbers": [3, 5, 2], "target": 16}
    score = rejection_sample.score
    assert score("arithmetic", "12+7=19</think><answer>19</answer>", example, True) == (1.0, 1.0)
    assert score("arithmetic", "12+7=18</think><answer>18</answer>", example, True) == (0.0, 1.0)
    assert score("countdown", "<think>x</think><answer>(3+5)*2</answer>", example, False) == (1, 1)
    accepted = [("long answer", 9), ("short", 2), ("long answer", 9), ("mid", 5)]
    assert rejection_sample.select(accepted, 2, "shortest") == [("short", 2), ("mid", 5)]
    assert rejection_sample.select(accepted, 0, "first") == [("long answer", 9), ("short", 2),
                                                              ("mid", 5)]


def test_convert_hf_round_trip(tmp_path, fixtures_dir):
    src = shutil.copytree(fixtures_dir / "qwen2_tied", tmp_path / "hf_in")
    assert convert_hf.main(["--to-orbax", str(src), str(tmp_path / "orbax"),
                            "--tolerance", "0"]) == 0.0
    assert convert_hf.main(["--to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf_out"),
                            "--tolerance", "0"]) == 0.0
    # the weights equal the fixture's (bfloat16 values upcast), and its reference logits hold
    cfg_in, params_in = r1jax.load_hf(src)
    cfg_out, params_out = r1jax.load_hf(tmp_path / "hf_out")
    assert cfg_out == cfg_in.replace(head_dim=cfg_out.head_dim)
    for a, b in zip(jax.tree.leaves(params_in), jax.tree.leaves(params_out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fixture = np.load(src / "fixture.npz")
    logits = r1jax.forward(params_out, jnp.asarray(fixture["forward_input_ids"]), cfg_out).logits
    np.testing.assert_allclose(np.asarray(logits), fixture["forward_logits"], atol=1e-4)
    # the fixture's weights are bfloat16 values, so a bfloat16 export is exact too
    assert convert_hf.main(["--to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf_bf16"),
                            "--dtype", "bfloat16"]) == 0.0
    config = json.loads((tmp_path / "hf_bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_convert_hf_tolerance_and_toy_checkpoint(tmp_path, pretrained):
    # a pretrain_tiny checkpoint (no stored config: --toy-model) rounded to bfloat16
    with pytest.raises(SystemExit, match=r"logit difference \S+ exceeds --tolerance 1e-09") as err:
        convert_hf.main(["--toy-model", "dense", "--dtype", "bfloat16", "--tolerance", "1e-9",
                         "--to-hf", str(pretrained), str(tmp_path / "hf")])
    assert 0 < float(str(err.value).split()[2]) < 0.5
    cfg, _ = r1jax.load_hf(tmp_path / "hf")
    assert cfg.model_type == "qwen2" and cfg.vocab_size == CharTokenizer().vocab_size


# Kill and resume --------------------------------------------------------------------------------

def _sft_process(data, workdir, steps, init_from, cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "examples/sft.py", "--data", str(data), "--workdir", str(workdir),
           "--init-from", str(init_from), "--toy-model", "dense", "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "44", "--checkpoint-every", "2", "--log-every", "1",
           "--quiet"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _committed_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


def _last_step(metrics: pathlib.Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_sft_killed_and_resumed_matches_uninterrupted_run(tmp_path, pretrained):
    """sft.py --init-from a pretrain_tiny checkpoint, SIGKILLed once step 4 is checkpointed and
    restarted, ends with the same metrics and bit-identical parameters as an uninterrupted run."""
    data = _write_jsonl(tmp_path / "traces.jsonl", _traces(10))
    steps, cache = 16, tmp_path / "jax_cache"
    reference = _sft_process(data, tmp_path / "reference", steps, pretrained, cache)
    victim = _sft_process(data, tmp_path / "victim", steps, pretrained, cache)
    deadline = time.time() + 150
    while max(_committed_steps(tmp_path / "victim"), default=0) < 4:
        assert victim.poll() is None, victim.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the run did not checkpoint step 4"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert _last_step(tmp_path / "victim" / "metrics.jsonl") < steps, "it finished before the kill"

    resumed = _sft_process(data, tmp_path / "victim", steps, pretrained, cache)
    for proc in (resumed, reference):
        output = proc.communicate(timeout=150)[0].decode()
        assert proc.returncode == 0, output[-3000:]
    records = {name: [json.loads(x) for x in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("reference", "victim")}
    assert [r["step"] for r in records["victim"]] == list(range(1, steps + 1))
    assert records["victim"] == records["reference"]  # every metric of every step, bit for bit
    final = {name: generate.load_checkpoint(tmp_path / name) for name in ("reference", "victim")}
    for a, b in zip(jax.tree.leaves(final["reference"].params),
                    jax.tree.leaves(final["victim"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # --init-from: the first step started from the pretrained weights, and the checkpoints
    # now carry the model config (no --toy-model needed to read them)
    base = generate.load_checkpoint(pretrained, toy_model="dense")
    assert final["victim"].cfg == base.cfg.replace(
        max_position_embeddings=final["victim"].cfg.max_position_embeddings)
    tokens, mask, _ = sft_data.load_sft_arrays(data, CharTokenizer(), 44)
    rows = np.asarray(next(iterate(range(len(tokens)), 4, 0))[0])  # sft's first batch (seed 0)
    batch = jnp.asarray(tokens[rows])
    logits = r1jax.forward(base.params, batch, base.cfg).logits
    ce = next_token_loss(logits, batch, jnp.asarray(mask[rows]))
    assert abs(float(ce) - records["reference"][0]["ce"]) < 1e-4


# Clear errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": "b"', r"bad\.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', r"bad\.jsonl:2: missing field 'completion'"),
    ('{"prompt": "a", "completion": 3}',
     r"bad\.jsonl:2: field 'completion' must be a string, got int"),
    ('["a", "b"]',
     r"bad\.jsonl:2: expected an object with string fields 'prompt' and 'completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}',
     r"bad\.jsonl:2: .*no 'assistant' message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}',
     r"bad\.jsonl:2: chat message 0: role must be"),
    ('{"messages": [{"role": "user"}]}',
     r"bad\.jsonl:2: messages\[0\] must be an object with string"),
])
def test_malformed_sft_jsonl_names_file_line_and_field(tmp_path, line, message):
    good = {"prompt": "What is 1+1? <think>", "completion": "2"}
    bad = _write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(sft_data.SFTDataError, match=message):
        sft_data.read_jsonl(bad)


def test_sft_script_reports_data_errors(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "caf\u00e9"}])
    args = ["--workdir", str(tmp_path / "run"), "--toy-model", "dense", "--steps", "1", "--quiet"]
    with pytest.raises(sft_data.SFTDataError,
                       match=r"bad\.jsonl:1: cannot tokenize this example: CharTokenizer"):
        sft.main(["--data", str(bad), *args])
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        sft.main(["--data", str(tmp_path / "missing.jsonl"), *args])
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(sft_data.SFTDataError, match="no examples"):
        sft.main(["--data", str(empty), *args])


def test_sft_data_masks_completion_and_assistant_tokens():
    tok = CharTokenizer()
    ids, mask = sft_data.encode_example(tok, {"prompt": "Q? <think>", "completion": "1</think>"})
    assert tok.decode(ids) == "Q? <think>1</think>" and ids[-1] == tok.eos_id
    assert mask == [0] * len(tok.encode("Q? <think>")) + [1, 1, 1]
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = sft_data.encode_example(tok, chat)
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "yo<|im_end|><eos>"
    short = sft_data.encode_example(tok, {"prompt": "Q? <think>", "completion": "1</think>"})
    tokens, masks, stats = sft_data.to_arrays([short, ([5, 6], [1, 0])], 5, tok.pad_id)
    assert tokens.shape == (1, 5) and masks.tolist() == [[0, 0, 0, 0, 1]]
    assert (stats.examples, stats.truncated, stats.dropped, stats.target_tokens) == (1, 1, 1, 1)


# orbax leaves the other reads of a failed restore un-awaited (see test_checkpoint.py)
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
def test_missing_or_corrupt_checkpoints_give_clear_errors(tmp_path, pretrained):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="nowhere does not exist"):
        generate.main(["--checkpoint", str(tmp_path / "nowhere"), "hello"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointNotFoundError, match="no committed step"):
        generate.main(["--checkpoint", str(tmp_path / "empty"), "hello"])
    # pretrain_tiny stores its model config, so --toy-model is not needed (nor trusted)
    assert generate.load_checkpoint(pretrained, toy_model=None).cfg.model_type == "qwen2"
    # a newest step whose arrays were lost: explicit step fails, default falls back to step 2
    broken = shutil.copytree(pretrained / "checkpoints", tmp_path / "broken" / "checkpoints")
    for f in (broken / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointCorruptError, match="step 3"):
        generate.load_checkpoint(broken, step=3, toy_model="dense")
    with pytest.warns(ckpt.CheckpointFallbackWarning):
        model = generate.load_checkpoint(broken, toy_model="dense")
    good = generate.load_checkpoint(pretrained, step=2, toy_model="dense")
    for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
