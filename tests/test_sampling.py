"""Tests for the sampler (r1jax.sampling) and the KV cache it drives.

Expected values come from the Hugging Face fixtures (greedy tokens and step logits that
transformers produced), from no-cache `forward` passes computed here (the sampler never
sees them), or from hand computations. Properties no reference checks: cached decode ==
full forward, seed determinism, top-k/top-p never leaving the allowed set, stop tokens,
MTP speculative decoding == plain decoding (greedy: exactly; sampling: same distribution,
by a chi-square test against the exact distribution computed from forward passes),
sharded == single-device, and input validation before anything compiles.

Compiles are the cost here: every distinct (config, shapes, SamplingConfig) compiles the
sampler anew, so models and sampler results are module-scoped fixtures and few
SamplingConfigs are used.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

import r1jax
from r1jax import sampling
from r1jax.losses import token_logprobs
from r1jax.model import cache as cache_lib
from r1jax.sampling import FINISHED_LENGTH, FINISHED_STOP, SamplingConfig, sample

GEN_FIXTURES = ["qwen2_tied", "deepseek_v3_yarn", "deepseek_v3_noqlora"]


# ----------------------------------------------------------------------------- helpers

def left_to_right(ids, mask):
    """Left-padded prompts (HF) -> right-padded prompts and lengths (our API)."""
    lengths = mask.sum(1).astype(np.int32)
    right = np.zeros_like(ids)
    for i in range(ids.shape[0]):
        right[i, :lengths[i]] = ids[i][mask[i] == 1]
    return right.astype(np.int32), lengths


def concat_rows(prompt, lengths, new):
    """Right-padded [b, P + n]: row i = prompt[i, :lengths[i]] followed by new[i]."""
    b, p = prompt.shape
    n = new.shape[1]
    out = np.zeros((b, p + n), np.int32)
    for i in range(b):
        out[i, :lengths[i]] = prompt[i, :lengths[i]]
        out[i, lengths[i]:lengths[i] + n] = new[i]
    return out


def step_logits(params, cfg, prompt, lengths, new):
    """No-cache forward logits that predict new[:, j]: [b, n, v] (float64 numpy).

    Right padding after a row's tokens cannot reach earlier positions (causal mask)."""
    seq = concat_rows(prompt, lengths, np.asarray(new))
    logits = np.asarray(r1jax.forward(params, jnp.asarray(seq), cfg, with_mtp=False).logits)
    n = new.shape[1]
    idx = lengths[:, None] - 1 + np.arange(n)[None]
    return np.take_along_axis(logits, idx[:, :, None], axis=1).astype(np.float64)


def log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def gather(x, tokens):
    return np.take_along_axis(np.asarray(x), np.asarray(tokens)[..., None], -1)[..., 0]


def random_prompts(seed, lengths, width, vocab):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    tokens = rng.integers(2, vocab, size=(len(lengths), width)).astype(np.int32)
    tokens[np.arange(width)[None] >= lengths[:, None]] = 0  # right padding
    return tokens, lengths


def chi_square_pvalue(counts, probs, min_expected=5.0):
    """Goodness of fit; cells with expected count < min_expected are pooled into one."""
    counts = np.asarray(counts, np.float64).ravel()
    expected = np.asarray(probs, np.float64).ravel() * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = ((counts - expected) ** 2 / expected).sum()
    return stats.chi2.sf(stat, len(counts) - 1)


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def fixture_models(fixtures_dir):
    out = {}
    for name in GEN_FIXTURES:
        cfg, params = r1jax.load_hf(fixtures_dir / name)
        out[name] = (cfg, params, dict(np.load(fixtures_dir / name / "fixture.npz")))
    return out


@pytest.fixture(scope="module")
def dense():
    cfg = r1jax.configs.tiny_dense()
    return cfg, r1jax.init_params(jax.random.key(0), cfg)


@pytest.fixture(scope="module")
def moe16():
    """tiny_moe (MLA, MoE, an MTP module) with a 16-token vocabulary: sampled drafts get
    accepted about half the time, and distributions over tokens are small enough for a
    chi-square test. One MoE model serves the whole file: each config compiles anew, and
    initialising tiny_moe alone costs ~15 s of compile."""
    cfg = r1jax.configs.tiny_moe(vocab_size=16)
    return cfg, r1jax.init_params(jax.random.key(0), cfg)


# ----------------------------------------------------------------------------- 1. parity with transformers

@pytest.mark.parametrize("name", GEN_FIXTURES)
def test_greedy_matches_transformers(fixture_models, name):
    cfg, params, fx = fixture_models[name]
    prompt, lengths = left_to_right(fx["gen_prompt_ids"], fx["gen_prompt_attention_mask"])
    want_tokens, want_logits = fx["gen_new_tokens"], fx["gen_step_logits"]
    n = want_tokens.shape[1]
    s = sample(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(0),
               SamplingConfig(max_new_tokens=n, temperature=0))
    np.testing.assert_array_equal(np.asarray(s.tokens), want_tokens)
    np.testing.assert_array_equal(np.asarray(s.lengths), [n, n])
    np.testing.assert_array_equal(np.asarray(s.finish_reason), [FINISHED_LENGTH] * 2)
    # the sampler's log-probs against transformers' step logits (greedy: softmax(logits))
    want_lp = gather(log_softmax(want_logits), want_tokens)
    np.testing.assert_allclose(np.asarray(s.logprobs), want_lp, atol=1e-4, rtol=0)
    # the logits behind each step, from one no-cache forward over prompt + generated
    got_logits = step_logits(params, cfg, prompt, lengths, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- 2. cached decode

@pytest.mark.parametrize("model", ["moe16", "dense"])
def test_cached_decode_equals_full_forward(request, model):
    cfg, params = request.getfixturevalue(model)
    # the prompts (and so the compiled shapes) of the speculative / top-p tests
    prompt, lengths = request.getfixturevalue("spec_prompts" if model == "moe16" else "dense_prompts")
    b, p = prompt.shape
    n = 10 if model == "moe16" else 8
    fed = np.random.default_rng(2).integers(2, cfg.vocab_size, size=(b, n)).astype(np.int32)
    rows = np.arange(b)
    # the reference: no cache, whole sequences (right-padded; causal, so padding is inert)
    full = np.asarray(r1jax.forward(params, jnp.asarray(concat_rows(prompt, lengths, fed)), cfg,
                                    with_mtp=False).logits)

    cache = r1jax.init_cache(cfg, b, p + n + 1)
    out = r1jax.forward(params, jnp.asarray(prompt), cfg, cache=cache)
    np.testing.assert_allclose(np.asarray(out.logits)[rows, lengths - 1], full[rows, lengths - 1],
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), np.full(b, p))
    cache = dataclasses.replace(out.cache, lengths=jnp.asarray(lengths))
    for j in range(n):
        out = r1jax.forward(params, jnp.asarray(fed[:, j:j + 1]), cfg, cache=cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[rows, lengths + j],
                                   atol=1e-5, rtol=0, err_msg=f"decode step {j}")
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + n)


# ----------------------------------------------------------------------------- 3. cache size

def _per_token_per_layer(cache, batch, slots):
    """Cached scalars per token per layer, read off the cache's arrays."""
    counts = set()
    for group in (cache.dense, cache.moe, cache.mtp):
        if group is None:
            continue
        for leaf in jax.tree.leaves(group):
            layers, b = leaf.shape[:2]  # [l, b, s, c + r] (MLA); [l, b, m, h, s], [l, b, m, s, h] (GQA)
            assert b == batch and slots in leaf.shape[2:]
        size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(group))
        counts.add(size // (layers * batch * slots))
    assert len(counts) == 1, counts
    return counts.pop()


def test_mla_cache_holds_latent_and_rope_key_only():
    tiny = r1jax.configs.tiny_moe()
    cache = r1jax.init_cache(tiny, 2, 8, with_mtp=True)
    assert cache.dense.latent_rope.shape == (1, 2, 8, 16 + 8)  # kv_lora_rank 16 + qk_rope 8
    assert cache.moe.latent_rope.shape == (2, 2, 8, 16 + 8)
    assert cache.mtp.latent_rope.shape == (1, 2, 8, 16 + 8)
    assert _per_token_per_layer(cache, 2, 8) == 24
    assert cache.max_length == 8
    assert cache_lib.values_per_token_per_layer(tiny) == 24
    assert r1jax.init_cache(tiny, 2, 8).mtp is None  # no MTP slots unless asked

    v3 = r1jax.configs.deepseek_v3_671b()
    abstract = jax.eval_shape(lambda: r1jax.init_cache(v3, 1, 8))
    assert _per_token_per_layer(abstract, 1, 8) == 512 + 64 == 576
    assert abstract.dense.latent_rope.shape[0] + abstract.moe.latent_rope.shape[0] == 61
    assert abstract.dense.latent_rope.dtype == jnp.bfloat16
    assert cache_lib.values_per_token_per_layer(v3) == 576
    # full keys and values: 128 heads x (192 key dims + 128 value dims)
    assert cache_lib.full_kv_values_per_token_per_layer(v3) == 128 * (192 + 128)

    dense = r1jax.configs.tiny_dense()  # GQA: keys and values of 2 kv heads x 16 dims
    assert r1jax.init_cache(dense, 2, 8).dense.k.shape == (2, 2, 2, 16, 8)  # [l, b, m, h, s]
    assert _per_token_per_layer(r1jax.init_cache(dense, 2, 8), 2, 8) == 2 * 2 * 16
    assert cache_lib.values_per_token_per_layer(dense) == 64


# ----------------------------------------------------------------------------- 4./5. temperature, top-k, top-p

TOPK = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5)
TOPP = SamplingConfig(max_new_tokens=8, temperature=0.7, top_p=0.5)
BATCH = 64
KEYS = (1, 2, 3)


@pytest.fixture(scope="module")
def dense_prompts(dense):
    """64 right-padded prompts of 1 to 6 tokens; the second half repeats the first."""
    lens = np.random.default_rng(3).integers(1, 7, size=BATCH // 2)
    tokens, lengths = random_prompts(4, lens, 6, dense[0].vocab_size)
    return np.concatenate([tokens, tokens]), np.concatenate([lengths, lengths])


@pytest.fixture(scope="module")
def truncated(dense, dense_prompts):
    """Samples of tiny_dense under TOPK and TOPP, 3 keys x 64 rows, and the forward
    logits (no cache) that predict each sampled token."""
    cfg, params = dense
    prompt, lengths = dense_prompts
    out = {}
    for name, scfg in (("top_k", TOPK), ("top_p", TOPP)):
        runs = []
        for k in KEYS:
            s = sample(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(k), scfg)
            tokens = np.asarray(s.tokens)
            runs.append((s, step_logits(params, cfg, prompt, lengths, tokens)))
        out[name] = (scfg, runs)
    out["prompt"] = (prompt, lengths)
    return out


def allowed_sets(logits, scfg):
    """Reference filter [..., v] bool, written independently of the library, with a small
    tolerance towards inclusion (the sampler's cached logits differ from these by ~1e-6)."""
    z = np.asarray(logits, np.float64) / scfg.temperature
    if scfg.top_k:
        kth = -np.sort(-z, axis=-1)[..., scfg.top_k - 1:scfg.top_k]
        return z >= kth - 1e-4
    order = np.argsort(-z, axis=-1)
    probs = np.exp(log_softmax(z))
    sorted_probs = np.take_along_axis(probs, order, -1)
    mass_before = np.cumsum(sorted_probs, -1) - sorted_probs
    keep_sorted = mass_before < scfg.top_p + 1e-4
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    return keep


@pytest.mark.parametrize("name", ["top_k", "top_p"])
def test_logprobs_equal_forward_logprobs_before_truncation(truncated, name):
    scfg, runs = truncated[name]
    for s, logits in runs:
        tokens, lp = np.asarray(s.tokens), np.asarray(s.logprobs)
        np.testing.assert_array_equal(np.asarray(s.lengths), scfg.max_new_tokens)
        # the trainer's function, on no-cache forward logits, at the same temperature
        want = np.asarray(token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens),
                                         scfg.temperature))
        np.testing.assert_allclose(lp, want, atol=1e-5, rtol=0)
        # and by hand: log softmax(logits / T)[token], untruncated
        np.testing.assert_allclose(lp, gather(log_softmax(logits / scfg.temperature), tokens),
                                   atol=1e-5, rtol=0)
        # not the log-prob renormalised over the kept tokens, larger by -log(kept mass)
        z = logits / scfg.temperature
        allowed = allowed_sets(logits, scfg)
        renorm = gather(log_softmax(np.where(allowed, z, -np.inf)), tokens)
        visible = (np.exp(log_softmax(z)) * allowed).sum(-1) < 0.9  # renorm - lp > 0.105
        assert visible.mean() > 0.5
        assert (renorm - lp)[visible].min() > 0.1


@pytest.mark.parametrize("name", ["top_k", "top_p"])
def test_truncated_sampling_stays_in_allowed_set(truncated, name):
    scfg, runs = truncated[name]
    outside_mass, emitted_last_kept, expected_last_kept = 0.0, 0, 0.0
    for s, logits in runs:
        tokens = np.asarray(s.tokens)
        allowed = allowed_sets(logits, scfg)
        bad = ~gather(allowed, tokens)
        assert not bad.any(), f"{bad.sum()} tokens outside the {name} set, e.g. at {np.argwhere(bad)[0]}"
        probs = np.exp(log_softmax(logits / scfg.temperature))
        outside_mass += (probs * ~allowed).sum()
        # the least likely kept token (where more than one is kept) is drawn as often as
        # the renormalised distribution says: the filter does not cut one token too many
        z = np.where(allowed, logits, np.inf)
        last = np.argmin(z, -1)
        several = allowed.sum(-1) > 1
        emitted_last_kept += ((tokens == last) & several).sum()
        expected_last_kept += (gather(probs, last) / (probs * allowed).sum(-1))[several].sum()
    print(f"{name}: least likely kept token drawn {emitted_last_kept} times, "
          f"expected {expected_last_kept:.1f}")
    assert expected_last_kept > 30  # power
    # a sum of independent Bernoulli draws: variance <= mean
    assert abs(emitted_last_kept - expected_last_kept) < 4 * np.sqrt(expected_last_kept)
    # power: untruncated sampling would have left the set this many times
    assert outside_mass > 200, outside_mass


def test_same_key_same_samples_different_key_different(truncated, dense):
    cfg, params = dense
    prompt, lengths = truncated["prompt"]
    scfg, runs = truncated["top_p"]
    again = sample(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(KEYS[0]), scfg)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(runs[0][0].tokens))
    np.testing.assert_array_equal(np.asarray(again.logprobs), np.asarray(runs[0][0].logprobs))
    a, b = np.asarray(runs[0][0].tokens), np.asarray(runs[1][0].tokens)
    print(f"different keys: {(a != b).mean():.2f} of tokens differ")
    assert (a != b).mean() > 0.5  # different keys: mostly different draws
    # rows of one call are independent draws: rows i and i + 32 share their prompt
    half = BATCH // 2
    assert (prompt[:half] == prompt[half:]).all()
    assert (a[:half] != a[half:]).any(1).all()


# ----------------------------------------------------------------------------- 6./7. stop tokens, speculative greedy

GREEDY = SamplingConfig(max_new_tokens=10, temperature=0)
SPEC_LENGTHS = [10, 3, 7, 1, 5, 10, 2, 8]


@pytest.fixture(scope="module")
def spec_prompts(moe16):
    return random_prompts(5, SPEC_LENGTHS, 10, moe16[0].vocab_size)


@pytest.fixture(scope="module")
def greedy_plain(moe16, spec_prompts):
    cfg, params = moe16
    prompt, lengths = spec_prompts
    return sample(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(0), GREEDY)


def choose_stop_ids(tokens, pad_id=0):
    """Stop ids, read off the greedy output, such that some rows stop at their first token,
    some later, and at least two never do. The pad id is left out, so that padding after
    a stop is visible."""
    vocab = [t for t in range(int(tokens.max()) + 1) if t != pad_id]
    fallback = None
    for a in vocab:
        for b in vocab:
            ids = (a,) if a == b else (a, b)
            if b < a:
                continue
            hit = np.isin(tokens, ids)
            first = np.where(hit.any(1), hit.argmax(1), -1)
            later, never = (first >= 2).any(), (first < 0).sum() >= 2
            if later and never and (first == 0).any():
                return ids
            if fallback is None and later and never:
                fallback = ids
    assert fallback is not None, tokens
    return fallback


def expected_after_stop(tokens, logprobs, stop_ids, pad_id=0):
    """What greedy decoding with stop ids must give, from the output without them."""
    tokens = tokens.copy()
    n = tokens.shape[1]
    hit = np.isin(tokens, stop_ids)
    stopped = hit.any(1)
    lengths = np.where(stopped, hit.argmax(1) + 1, n)
    after = np.arange(n)[None] >= lengths[:, None]
    tokens[after] = pad_id
    return tokens, logprobs, lengths, np.where(stopped, FINISHED_STOP, FINISHED_LENGTH), after


def test_greedy_reference_is_right(moe16, spec_prompts, greedy_plain):
    """The plain greedy output that the stop-token, speculative and sharded tests compare
    against: each token is the argmax of no-cache forward logits, log-probs by hand."""
    cfg, params = moe16
    prompt, lengths = spec_prompts
    tokens = np.asarray(greedy_plain.tokens)
    logits = step_logits(params, cfg, prompt, lengths, tokens)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(greedy_plain.logprobs), gather(log_softmax(logits), tokens),
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(greedy_plain.lengths), GREEDY.max_new_tokens)
    np.testing.assert_array_equal(np.asarray(greedy_plain.finish_reason), FINISHED_LENGTH)
    np.testing.assert_array_equal(np.asarray(greedy_plain.drafts_proposed), 0)


@pytest.fixture(scope="module")
def stop_ids(greedy_plain):
    return choose_stop_ids(np.asarray(greedy_plain.tokens))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_greedy_with_stop_tokens(moe16, spec_prompts, greedy_plain, stop_ids, speculative):
    """Rows that emit a stop id end there (the stop token counted, pad after it); the others
    run to max_new_tokens, token for token as without stop ids. Speculative (MTP) greedy
    decoding must give exactly the same, for right-padded prompts of lengths 1 to 10.
    (One speculative run covers both the stopping rows and rows that never stop: each
    distinct SamplingConfig costs a compile.)"""
    cfg, params = moe16
    prompt, lengths = spec_prompts
    scfg = dataclasses.replace(GREEDY, stop_token_ids=stop_ids, speculative=speculative)
    s = sample(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), jax.random.key(0), scfg)
    want_tokens, want_lp, want_len, want_reason, after = expected_after_stop(
        np.asarray(greedy_plain.tokens), np.asarray(greedy_plain.logprobs), stop_ids)
    assert (want_reason == FINISHED_STOP).sum() >= 2 and (want_reason == FINISHED_LENGTH).sum() >= 2
    np.testing.assert_array_equal(np.asarray(s.tokens), want_tokens)
    np.testing.assert_array_equal(np.asarray(s.lengths), want_len)
    np.testing.assert_array_equal(np.asarray(s.finish_reason), want_reason)
    lp = np.asarray(s.logprobs)
    np.testing.assert_allclose(np.where(after, 0, lp), np.where(after, 0, want_lp), atol=1e-5, rtol=0)
    accepted, proposed = np.asarray(s.drafts_accepted), np.asarray(s.drafts_proposed)
    if not speculative:
        assert not proposed.any() and not accepted.any()
        return
    # the prefill emits the first token, each verify step one more, and one per accepted
    # draft (an accepted draft may find no room for its extra token: at the length limit, or
    # after a stop)
    extra = proposed + accepted - (want_len - 1)
    assert np.isin(extra, [0, 1]).all(), (proposed, accepted, want_len)
    assert 0 < s.acceptance_rate < 1, s.acceptance_rate
    print(f"greedy speculative acceptance (stop ids {stop_ids}): {s.acceptance_rate:.3f}")


# ----------------------------------------------------------------------------- 7. speculative sampling distribution

N_DRAWS = 4000
DIST = SamplingConfig(max_new_tokens=3, temperature=1.0)
DIST_SPEC = dataclasses.replace(DIST, speculative=True)
PROMPT_TOKEN = 3


@pytest.fixture(scope="module")
def exact_distribution(moe16):
    """Exact P(t1), P(t1, t2), P(t3) after the one-token prompt, and the draft
    distribution of t2 (MTP at the prompt position, fed t1), from no-cache forwards."""
    cfg, params = moe16
    v = cfg.vocab_size
    # every sequence (prompt, t1, t2) in one no-cache forward; causal, so position 0 gives
    # p(t1), position 1 p(t2 | t1), position 2 p(t3 | t1, t2), and the MTP module at
    # position 0 (fed t1) the draft q(t2 | t1) that the speculative sampler proposes
    t1, t2 = np.meshgrid(np.arange(v), np.arange(v), indexing="ij")
    seq = np.stack([np.full(v * v, PROMPT_TOKEN), t1.ravel(), t2.ravel()], 1).astype(np.int32)
    out = r1jax.forward(params, jnp.asarray(seq), cfg)
    probs = np.exp(log_softmax(np.asarray(out.logits))).reshape(v, v, 3, v)
    p1 = probs[0, 0, 0]
    p2 = probs[:, 0, 1]  # [t1, t2]
    p3 = probs[:, :, 2]  # [t1, t2, t3]
    q2 = np.exp(log_softmax(np.asarray(out.mtp_logits)[:, 0])).reshape(v, v, v)[:, 0]  # [t1, t2]
    joint12 = p1[:, None] * p2
    return dict(p1=p1, joint12=joint12, p3=np.einsum("ab,abc->c", joint12, p3),
                q_joint12=p1[:, None] * q2,
                accept_first=(p1 * np.minimum(p2, q2).sum(1)).sum())


@pytest.mark.parametrize("scfg", [DIST, DIST_SPEC], ids=["plain", "speculative"])
def test_sampling_distribution(moe16, exact_distribution, scfg):
    cfg, params = moe16
    v = cfg.vocab_size
    prompt = jnp.full((N_DRAWS, 1), PROMPT_TOKEN, jnp.int32)
    s = sample(params, cfg, prompt, jnp.ones((N_DRAWS,), jnp.int32), jax.random.key(7), scfg)
    tokens = np.asarray(s.tokens)
    np.testing.assert_array_equal(np.asarray(s.lengths), 3)
    ex = exact_distribution
    count1 = np.bincount(tokens[:, 0], minlength=v)
    count12 = np.bincount(tokens[:, 0] * v + tokens[:, 1], minlength=v * v)
    count3 = np.bincount(tokens[:, 2], minlength=v)
    p_values = dict(t1=chi_square_pvalue(count1, ex["p1"]),
                    t1t2=chi_square_pvalue(count12, ex["joint12"]),
                    t3=chi_square_pvalue(count3, ex["p3"]))
    print(f"{'speculative' if scfg.speculative else 'plain'} chi-square p-values: {p_values}")
    assert min(p_values.values()) > 1e-3, p_values
    # power: the same test rejects the draft distribution and the first-token distribution
    assert chi_square_pvalue(count12, ex["q_joint12"]) < 1e-6
    assert chi_square_pvalue(np.bincount(tokens[:, 1], minlength=v), ex["p1"]) < 1e-6
    if scfg.speculative:
        # the first draft (t2) is accepted with probability sum_t1 p(t1) sum_t min(p, q);
        # accepted -> t2 and t3 come out of one step (one proposal per row)
        accepted_first = (np.asarray(s.drafts_proposed) == 1).mean()
        sd = np.sqrt(ex["accept_first"] * (1 - ex["accept_first"]) / N_DRAWS)
        assert abs(accepted_first - ex["accept_first"]) < 5 * sd, (accepted_first, ex["accept_first"])
        print(f"sampling speculative acceptance: {s.acceptance_rate:.3f} "
              f"(first draft {accepted_first:.3f}, exact {ex['accept_first']:.3f})")


# ----------------------------------------------------------------------------- 8. sharded

@pytest.fixture(scope="module")
def mesh():
    return r1jax.make_mesh("fsdp=2,tensor=2,expert=2")


def put_on_mesh(params, cfg, mesh):
    """The same weights, laid out as `init_params(..., mesh=mesh)` would create them.
    (Placing them costs far less than compiling a sharded init; that init giving the
    same values on any mesh is a test of r1jax.sharding.)"""
    from r1jax.model.transformer import param_shardings
    return jax.device_put(params, param_shardings(cfg, mesh))


@pytest.mark.parametrize("case", ["moe_greedy", "dense_top_p"])
def test_sharded_sampling_equals_single_device(request, mesh, case):
    """8 devices (fsdp 2 x tensor 2 x expert 2; the batch over data x fsdp x expert) give
    the single-device result: greedy on the MoE model; temperature 0.7 + top-p (a sort
    over the vocabulary, which is sharded over `tensor`) with the same key on tiny_dense.
    The single-device runs are those of the tests above (no extra compile)."""
    if case == "moe_greedy":
        (cfg, params), (prompt, lengths) = request.getfixturevalue("moe16"), request.getfixturevalue("spec_prompts")
        scfg, key, single = GREEDY, 0, request.getfixturevalue("greedy_plain")
    else:
        (cfg, params), (prompt, lengths) = request.getfixturevalue("dense"), request.getfixturevalue("dense_prompts")
        scfg, runs = request.getfixturevalue("truncated")["top_p"]
        key, single = KEYS[0], runs[0][0]
    params_sharded = put_on_mesh(params, cfg, mesh)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(params_sharded))
    batch = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    got = sample(params_sharded, cfg, jax.device_put(jnp.asarray(prompt), batch),
                 jax.device_put(jnp.asarray(lengths), batch), jax.random.key(key), scfg,
                 mesh_rules=r1jax.MeshRules(mesh))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(single.logprobs), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(single.lengths))
    np.testing.assert_array_equal(np.asarray(got.finish_reason), np.asarray(single.finish_reason))


# ----------------------------------------------------------------------------- 8b. the draw, the decode layout

def test_draw_follows_the_probabilities_and_skips_zeros():
    """Inverse-CDF draws from log-probabilities: frequencies fit the probabilities
    (chi-square), zero-probability entries (-inf: leading, inside, trailing, across the
    128-entry blocks) never come out."""
    rng = np.random.default_rng(0)
    v = 300  # not a multiple of the block size
    probs = rng.random((4, v)) ** 4
    probs[:, :5] = probs[:, 140:260] = probs[:, -7:] = 0
    probs[2] = 0
    probs[2, 131] = 1.0  # a single allowed entry
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    logits[1] += 500.0  # unnormalised and large: only differences matter
    logits = jnp.asarray(logits, jnp.float32)
    draws = np.stack([np.asarray(sampling.draw(jax.random.key(k), logits))
                      for k in range(400)])  # [400, 4]
    assert (probs[np.arange(4)[None], draws] > 0).all()
    assert (draws[:, 2] == 131).all()
    for row in (0, 1, 3):
        counts = np.bincount(draws[:, row], minlength=v)
        assert chi_square_pvalue(counts, probs[row] / probs[row].sum()) > 1e-3


@pytest.mark.parametrize("model", ["moe16", "dense"])
def test_unrolled_decode_equals_scanned_decode(request, model):
    """The decode loop over per-layer weights (`unroll_layers`) is the same computation as
    the scan over the stacked layers."""
    cfg, params = request.getfixturevalue(model)
    prompt, lengths = random_prompts(6, [4, 1, 6], 6, cfg.vocab_size)
    results = []
    for unroll in (False, True):
        scfg = SamplingConfig(max_new_tokens=5, temperature=1.0, unroll_layers=unroll,
                              record_experts=cfg.n_routed_experts > 0)
        results.append(sample(params, cfg, prompt, lengths, jax.random.key(1), scfg))
    scanned, unrolled = results
    np.testing.assert_array_equal(np.asarray(unrolled.tokens), np.asarray(scanned.tokens))
    np.testing.assert_allclose(np.asarray(unrolled.logprobs), np.asarray(scanned.logprobs), atol=1e-6)
    if scanned.experts is not None:
        np.testing.assert_array_equal(np.asarray(unrolled.experts), np.asarray(scanned.experts))


@pytest.mark.parametrize("model, scfg", [
    ("moe16", SamplingConfig(max_new_tokens=6, temperature=0, record_experts=True)),
    ("moe16", SamplingConfig(max_new_tokens=6, temperature=0, speculative=True)),
    ("dense", SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)),
], ids=["moe_greedy_experts", "moe_speculative", "dense_top_p"])
def test_samples_per_prompt_equals_repeated_prompts(request, model, scfg):
    """G samples per prompt (one prefill per prompt) are the rows that the prompts repeated
    G times give: same tokens, log-probs, lengths and recorded experts, row i * G + j
    continuing prompt i."""
    cfg, params = request.getfixturevalue(model)
    g = 3
    prompt, lengths = random_prompts(7, [5, 1, 3], 5, cfg.vocab_size)
    shared = sample(params, cfg, prompt, lengths, jax.random.key(2),
                    dataclasses.replace(scfg, samples_per_prompt=g))
    repeated = sample(params, cfg, np.repeat(prompt, g, 0), np.repeat(lengths, g, 0),
                      jax.random.key(2), scfg)
    assert np.asarray(shared.tokens).shape == (len(prompt) * g, scfg.max_new_tokens)
    for field in ("tokens", "lengths", "finish_reason", "drafts_accepted", "drafts_proposed",
                  "experts"):
        a, b = getattr(shared, field), getattr(repeated, field)
        assert (a is None) == (b is None), field
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(repeated.logprobs),
                               atol=1e-5)
    if scfg.temperature > 0:  # the G rows of a prompt are different draws
        tokens = np.asarray(shared.tokens).reshape(len(prompt), g, -1)
        assert (tokens[:, 0] != tokens[:, 1]).any(-1).all()


@pytest.mark.parametrize("model, scfg", [
    ("moe16", SamplingConfig(max_new_tokens=9, temperature=0, record_experts=True)),
    ("dense", SamplingConfig(max_new_tokens=9, temperature=1.0, top_p=0.9)),
    ("dense", SamplingConfig(max_new_tokens=9, temperature=1.0, unroll_layers=False,
                             cache_length=20)),
], ids=["moe_greedy_experts", "dense_top_p", "dense_stacked_longer_cache"])
def test_growing_cache_windows_equal_one_window(request, model, scfg):
    """A decode loop that grows its cache through windows (each step attending only to
    the slots its window holds) gives what one loop over the whole cache gives."""
    cfg, params = request.getfixturevalue(model)
    prompt, lengths = random_prompts(8, [6, 1, 4, 6], 6, cfg.vocab_size)
    windows = sampling.decode_windows(prompt.shape[1], scfg.cache_length or 6 + 9,
                                      dataclasses.replace(scfg, decode_windows=3))
    assert len(windows) == 3 and windows[0] < windows[1] < windows[2], windows
    one, grown = (sample(params, cfg, prompt, lengths, jax.random.key(5),
                         dataclasses.replace(scfg, decode_windows=k)) for k in (1, 3))
    for field in ("tokens", "lengths", "finish_reason", "experts"):
        a, b = getattr(one, field), getattr(grown, field)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=field)
    np.testing.assert_allclose(np.asarray(grown.logprobs), np.asarray(one.logprobs), atol=1e-5)


# ----------------------------------------------------------------------------- 9. bad input

@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the sampler started compiling before rejecting bad input")
    monkeypatch.setattr(sampling, "_sample_plain", refuse)
    monkeypatch.setattr(sampling, "_sample_speculative", refuse)


PROMPT3 = np.array([[5, 6, 7], [8, 9, 0]], np.int32)
LENS3 = np.array([3, 2], np.int32)


@pytest.mark.parametrize("prompt, lengths, scfg, words", [
    (PROMPT3, LENS3, SamplingConfig(max_new_tokens=4, cache_length=6), ["cache_length", "6", "7"]),
    (np.zeros((2, 8), np.int32) + 5, LENS3, SamplingConfig(max_new_tokens=1, cache_length=6),
     ["cache_length", "8"]),
    (PROMPT3, np.array([3, 0], np.int32), SamplingConfig(max_new_tokens=2), ["prompt_lengths", "0"]),
    (np.zeros((2, 0), np.int32), np.array([0, 0], np.int32), SamplingConfig(max_new_tokens=2),
     ["empty", "prompt_tokens"]),
    (PROMPT3, np.array([3, 4], np.int32), SamplingConfig(max_new_tokens=2), ["prompt_lengths", "4"]),
    (PROMPT3, LENS3, SamplingConfig(max_new_tokens=2, stop_token_ids=(1, 256)),
     ["stop_token_ids", "256"]),
    (PROMPT3, LENS3, SamplingConfig(max_new_tokens=2, stop_token_ids=(-1,)), ["stop_token_ids", "-1"]),
    (PROMPT3, np.array([3, 2, 1], np.int32), SamplingConfig(max_new_tokens=2),
     ["prompt_lengths", "[2]"]),
    (PROMPT3, np.int32(3), SamplingConfig(max_new_tokens=2), ["prompt_lengths"]),
    (PROMPT3[0], LENS3[:1], SamplingConfig(max_new_tokens=2), ["prompt_tokens", "(3,)"]),
    (PROMPT3, LENS3, SamplingConfig(max_new_tokens=2, speculative=True), ["speculative", "MTP"]),
], ids=["cache_too_short", "prompt_longer_than_cache", "zero_length", "empty_array",
        "length_over_width", "stop_id_too_big", "stop_id_negative", "lengths_wrong_size",
        "lengths_scalar", "prompt_1d", "speculative_without_mtp"])
def test_bad_input_raises_before_compiling(dense, no_compile, prompt, lengths, scfg, words):
    cfg, params = dense  # tiny_dense: vocabulary 256, no MTP module
    with pytest.raises(ValueError) as err:
        sample(params, cfg, prompt, lengths, jax.random.key(0), scfg)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), ["max_new_tokens", "0"]),
    (dict(max_new_tokens=-3), ["max_new_tokens", "-3"]),
    (dict(top_p=0.0), ["top_p", "0.0"]),
    (dict(top_p=1.5), ["top_p", "1.5"]),
    (dict(temperature=-1.0), ["temperature", "-1.0"]),
    (dict(top_k=-2), ["top_k", "-2"]),
    (dict(samples_per_prompt=0), ["samples_per_prompt", "0"]),
    (dict(decode_windows=0), ["decode_windows", "0"]),
])
def test_bad_sampling_config_raises(kwargs, words):
    with pytest.raises(ValueError) as err:
        SamplingConfig(**kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
