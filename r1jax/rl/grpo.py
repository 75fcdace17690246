"""GRPO objective: group-relative advantages, clipped surrogate, KL penalty, loss aggregation.

GRPO was introduced in DeepSeekMath (Shao et al. 2024, arXiv 2402.03300) and used to train
DeepSeek-R1-Zero and DeepSeek-R1 (arXiv 2501.12948). DAPO (arXiv 2503.14476) and Dr. GRPO
(arXiv 2503.20783) are variants of the same objective; `GRPOConfig` covers all four.

Array layout: a rollout of b prompts with G completions each is flattened row-major into
n = b * G rows (row i * G + j is completion j of prompt i); T is the padded completion length.
All per-token arrays are [n, T]; `mask` is 1 on completion tokens and 0 on padding. A row whose
mask is all zero (padding rows used to keep shapes static, e.g. after dynamic sampling) is
ignored by every aggregation and metric.

Only array functions live here; the rollout and the train step call them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "constant_normalizer")
STD_ESTIMATORS = ("unbiased", "population")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the GRPO objective and of the loop that feeds it.

    The objective maximised per completion token t of completion i (DeepSeekMath eq. 3) is

        J_it = min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i) - beta * D_KL_it
        rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)

    and `policy_loss` returns the aggregate of -J to minimise.

    Fields (paper symbol in brackets):
        num_generations: [G] completions sampled per prompt (group size). >= 2, since a group of
            one has no baseline.
        epsilon_low, epsilon_high: [epsilon] clip range of the ratio, [1 - eps_low, 1 + eps_high].
            Equal in GRPO/PPO (0.2); DAPO's clip-higher uses 0.2 / 0.28. eps_low >= 1 disables
            the lower clip (the ratio is always positive).
        dual_clip: [c] dual-clip PPO bound (Ye et al. 2020), > 1, or None for off. For A < 0 the
            objective becomes max(J_clip, c * A), so a ratio above c stops the gradient instead
            of letting a stale negative sample push the loss without bound.
        beta: [beta] KL coefficient. 0 means no reference model at all (ref_logp may be None).
        kl_estimator: per-token estimator of KL(pi_theta || pi_ref): 'k1', 'k2' or 'k3'
            (Schulman's names). GRPO uses k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1.
        num_iterations: [mu] optimisation passes over each rollout batch. With mu = 1 and the
            batch consumed in a single step, pi_old == pi_theta and rho == 1.
        scale_rewards: divide the group-centred reward by the group std (GRPO, DAPO). False is
            Dr. GRPO, which argues the std term over-weights groups that are nearly all right
            or all wrong.
        std_estimator: 'unbiased' (ddof = 1) or 'population' (ddof = 0) for that std. The papers
            write std(r) without saying which. Default 'unbiased' because the reference GRPO
            implementations (TRL, verl, OpenRLHF) call torch.std, whose default is unbiased, so
            runs stay comparable with theirs. With G fixed the two differ by the constant factor
            sqrt(G / (G - 1)) on every group (up to advantage_eps), i.e. a learning-rate scale:
            3% at G = 16, negligible at G = 64.
        advantage_eps: added to the std so that near-constant groups do not blow up. Groups
            whose rewards are all equal get exactly zero advantage regardless.
        loss_aggregation: how per-token terms become one scalar:
            'sequence_mean': mean over each completion's tokens, then mean over completions
                (1/G sum_i 1/|o_i| sum_t, GRPO as published).
            'token_mean': mean over all completion tokens of the batch (DAPO), so long
                completions are not down-weighted per token.
            'constant_normalizer': sum over each completion's tokens divided by a constant, then
                mean over completions (Dr. GRPO), removing the 1/|o_i| length bias.
        max_completion_length: generation cap for the rollout [L_max in DAPO]; also the constant
            of 'constant_normalizer' unless loss_normalizer is set.
        loss_normalizer: overrides that constant; None means max_completion_length.
        temperature: sampling temperature of the rollout. log-probs passed to `policy_loss` must
            come from logits / temperature so that rho compares the policy that sampled.
        dynamic_sampling: DAPO's filter: drop groups whose rewards are all equal (they carry
            zero advantage) and keep sampling until the batch is full; see
            `groups_with_signal`.
        overlong_buffer: DAPO's soft overlong punishment length [L_cache], or None for off; see
            `overlong_penalty`.
        learning_rate: for the optimiser the train step builds; not used in this module. Kept
            here so that presets carry the paper's value.
    """

    num_generations: int = 64
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    num_iterations: int = 1
    scale_rewards: bool = True
    std_estimator: str = "unbiased"
    advantage_eps: float = 1e-4
    loss_aggregation: str = "sequence_mean"
    max_completion_length: int = 1024
    loss_normalizer: Optional[float] = None
    temperature: float = 1.0
    dynamic_sampling: bool = False
    overlong_buffer: Optional[int] = None
    learning_rate: float = 1e-6

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"GRPOConfig.{name} {why}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.num_generations) or self.num_generations < 2:
            bad("num_generations", "must be an int >= 2")
        for name in ("epsilon_low", "epsilon_high", "temperature", "learning_rate"):
            if not is_num(getattr(self, name)) or not getattr(self, name) > 0:
                bad(name, "must be a number > 0")
        if self.dual_clip is not None and (not is_num(self.dual_clip) or not self.dual_clip > 1):
            bad("dual_clip", "must be None or a number > 1")
        for name in ("beta", "advantage_eps"):
            if not is_num(getattr(self, name)) or not getattr(self, name) >= 0:
                bad(name, "must be a number >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"must be one of {KL_ESTIMATORS}")
        if not is_int(self.num_iterations) or self.num_iterations < 1:
            bad("num_iterations", "must be an int >= 1")
        for name in ("scale_rewards", "dynamic_sampling"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be a bool")
        if self.std_estimator not in STD_ESTIMATORS:
            bad("std_estimator", f"must be one of {STD_ESTIMATORS}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            bad("loss_aggregation", f"must be one of {LOSS_AGGREGATIONS}")
        if not is_int(self.max_completion_length) or self.max_completion_length < 1:
            bad("max_completion_length", "must be an int >= 1")
        if self.loss_normalizer is not None and (
            not is_num(self.loss_normalizer) or not self.loss_normalizer > 0
        ):
            bad("loss_normalizer", "must be None or a number > 0")
        if self.overlong_buffer is not None and (
            not is_int(self.overlong_buffer)
            or not 0 < self.overlong_buffer < self.max_completion_length
        ):
            bad("overlong_buffer", "must be None or an int in (0, max_completion_length)")

    @property
    def std_ddof(self) -> int:
        """Delta degrees of freedom for `group_advantages` implied by `std_estimator`."""
        return 1 if self.std_estimator == "unbiased" else 0

    @property
    def normalizer(self) -> float:
        """The constant of 'constant_normalizer' aggregation."""
        if self.loss_normalizer is not None:
            return float(self.loss_normalizer)
        return float(self.max_completion_length)


def grpo_deepseekmath() -> GRPOConfig:
    """GRPO as published in DeepSeekMath (arXiv 2402.03300, sec. 4.2 / 5.2.1).

    Stated in the paper: G = 64 samples per question, KL coefficient beta = 0.04, policy
    learning rate 1e-6, max length 1024, "a single update following each exploration stage"
    (mu = 1), k3 KL estimator, std-normalised outcome advantages, per-sequence token mean.
    Not stated: epsilon (0.2 here, the PPO default) and the sampling temperature (1.0 here).
    """
    return GRPOConfig(
        num_generations=64, epsilon_low=0.2, epsilon_high=0.2, beta=0.04, kl_estimator="k3",
        num_iterations=1, scale_rewards=True, loss_aggregation="sequence_mean",
        max_completion_length=1024, temperature=1.0, learning_rate=1e-6,
    )


def r1_zero() -> GRPOConfig:
    """DeepSeek-R1-Zero training (arXiv 2501.12948, hyper-parameters from the revised/Nature
    version's supplementary material).

    Stated: G = 16 outputs per question, learning rate 3e-6, KL coefficient 0.001, rollout
    temperature 1, max length 32,768 tokens (raised to 65,536 after step 8.2k: change
    max_completion_length then). Each rollout of 8,192 outputs is split into 16 mini-batches
    trained for one inner epoch (mu = 1 per sample, but later mini-batches are off-policy).
    The reference model is replaced by the current policy every 400 steps (train-step concern).
    Uncertain: the clip ratio epsilon = 10 (a very loose clip, so the lower clip never binds) is
    taken as reported for R1 but we could not re-check the exact wording; the KL estimator is
    taken to be k3 (the paper reprints the DeepSeekMath formula), and the paper writes the
    objective per sequence, so the aggregation is taken from DeepSeekMath ('sequence_mean').
    """
    return GRPOConfig(
        num_generations=16, epsilon_low=10.0, epsilon_high=10.0, beta=0.001, kl_estimator="k3",
        num_iterations=1, scale_rewards=True, loss_aggregation="sequence_mean",
        max_completion_length=32768, temperature=1.0, learning_rate=3e-6,
    )


def dapo() -> GRPOConfig:
    """DAPO (arXiv 2503.14476): clip-higher, dynamic sampling, token-level loss, overlong shaping.

    Stated: eps_low = 0.2, eps_high = 0.28, no KL term (beta = 0), token-level policy-gradient
    loss, dynamic sampling, 16 responses per prompt, learning rate 1e-6 (with 20 warm-up
    rollout steps), expected max length 16,384 + 4,096 soft punish cache = 20,480 generated
    tokens. Advantages keep the group std. Each rollout of 512 prompts is trained in 16
    mini-batches (mu = 1 per sample). Uncertain: training temperature (1.0 here).
    """
    return GRPOConfig(
        num_generations=16, epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
        num_iterations=1, scale_rewards=True, loss_aggregation="token_mean",
        max_completion_length=20480, overlong_buffer=4096, dynamic_sampling=True,
        temperature=1.0, learning_rate=1e-6,
    )


def dr_grpo() -> GRPOConfig:
    """Dr. GRPO (arXiv 2503.20783): GRPO without the std and 1/|o_i| normalisations.

    Stated: no std scaling of advantages, per-completion token sums divided by a constant (the
    generation budget) instead of by |o_i|, no KL term (beta = 0). Taken from the authors'
    released Oat-Zero recipe and so less certain: G = 8, max length 3000, learning rate 1e-6,
    temperature 1.0, epsilon 0.2.
    """
    return GRPOConfig(
        num_generations=8, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
        num_iterations=1, scale_rewards=False, loss_aggregation="constant_normalizer",
        max_completion_length=3000, temperature=1.0, learning_rate=1e-6,
    )


def group_advantages(rewards_bg, scale_by_std=True, eps=1e-4, std_ddof=1):
    """Group-relative advantages A = (r - mean_G(r)) / (std_G(r) + eps).

    Args:
        rewards_bg: [b, G] scalar reward of completion j of prompt i.
        scale_by_std: divide by the group std (GRPO); False gives Dr. GRPO's r - mean.
        eps: added to the std.
        std_ddof: 1 for the unbiased std, 0 for the population std.

    Returns:
        [b, G] float32 advantages; exactly zero for groups whose rewards are all equal.
    """
    r = jnp.asarray(rewards_bg, jnp.float32)
    if r.ndim != 2 or r.shape[1] - std_ddof < 1:
        raise ValueError(f"rewards_bg must be [b, G] with G > std_ddof, got shape {r.shape}")
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_by_std:
        adv = adv / (jnp.std(r, axis=1, ddof=std_ddof, keepdims=True) + eps)
    # Rounding in the mean would otherwise leave tiny non-zero values, amplified by 1/eps.
    flat = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    return jnp.where(flat, 0.0, adv)


def kl_divergence(logp, ref_logp, estimator="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs.

    With d = ref_logp - logp: k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 (>= 0; GRPO's choice).
    Gradients flow through logp only; ref_logp is treated as constant.

    Args:
        logp, ref_logp: [..., T] log-probs of the sampled tokens under policy and reference.
        estimator: 'k1', 'k2' or 'k3'.

    Returns:
        [..., T] float32.
    """
    d = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)) - jnp.asarray(logp, jnp.float32)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return jnp.expm1(d) - d
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _masked_sum(x, mask, axis=None):
    # where, not x * mask: padding positions may hold inf/nan log-probs.
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def _masked_mean(x, mask, axis=None):
    return _masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def _aggregate(per_token, mask, cfg):
    """Reduces [n, T] per-token terms to a scalar per `cfg.loss_aggregation`."""
    if cfg.loss_aggregation == "token_mean":
        return _masked_mean(per_token, mask)
    row_sum_n = _masked_sum(per_token, mask, axis=1)
    row_len_n = jnp.sum(mask, axis=1)
    valid_n = row_len_n > 0
    if cfg.loss_aggregation == "sequence_mean":
        row_n = row_sum_n / jnp.maximum(row_len_n, 1)
    else:
        row_n = row_sum_n / cfg.normalizer
    return _masked_mean(row_n, valid_n)


def _surrogate(ratio, adv_nT, cfg):
    """Clipped (and optionally dual-clipped) surrogate objective, to be maximised."""
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    surr = jnp.minimum(ratio * adv_nT, clipped * adv_nT)
    if cfg.dual_clip is not None:
        surr = jnp.where(adv_nT < 0, jnp.maximum(surr, cfg.dual_clip * adv_nT), surr)
    return surr


def policy_loss(logp, old_logp, ref_logp, advantages, mask, cfg, *, entropy=None):
    """GRPO loss to minimise: aggregate over tokens of -(surrogate - beta * KL).

    For A >= 0 the ratio is clipped from above (gradient stops once rho > 1 + eps_high); for
    A < 0 from below (stops once rho < 1 - eps_low). PPO's min keeps the unclipped term on the
    other side, so e.g. A > 0 with rho < 1 - eps_low still has gradient. Dual clip (cfg.dual_clip
    = c) additionally bounds A < 0 terms by c * A in objective terms, i.e. the per-token loss is
    min(-surrogate, -c * A); rho > c then has zero gradient.

    Args:
        logp: [n, T] float32 log pi_theta of the sampled tokens (differentiated).
        old_logp: [n, T] log pi_old from the rollout policy; treated as constant.
        ref_logp: [n, T] log pi_ref, treated as constant; may be None when cfg.beta == 0.
        advantages: [n] one advantage per completion (e.g. group_advantages(...).reshape(-1)).
        mask: [n, T] 1 on completion tokens, 0 on prompt/padding.
        cfg: GRPOConfig (hashable: pass it as a static argument under jit).
        entropy: optional [n, T] per-token policy entropy, only for the metric.

    Normalisers (token counts, completion counts) come from the arrays given, so a batch split
    into accumulated micro-batches is weighted exactly like the whole batch only for
    'sequence_mean' / 'constant_normalizer' with equal-sized micro-batches; 'token_mean' needs
    equal token counts too.

    Returns:
        (loss, metrics): loss is a float32 scalar. metrics holds float32 scalars:
        clip_frac_low / clip_frac_high / clip_frac_dual (fraction of completion tokens whose
        objective term is clipped, i.e. has zero gradient, on that side), kl (token mean of
        the chosen estimator; 0 without ref_logp), entropy (token mean of `entropy` if given,
        else -mean logp, the one-sample estimate that is unbiased when the tokens were sampled
        from pi_theta itself), ratio_mean/min/max over completion tokens, adv_mean/adv_std
        over completions.
    """
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"ref_logp is required when GRPOConfig.beta > 0 (beta={cfg.beta})")
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    m = jnp.asarray(mask) > 0
    adv_n = jnp.asarray(advantages, jnp.float32)
    adv_nT = jnp.broadcast_to(adv_n[:, None], logp.shape)

    ratio = jnp.exp(jnp.where(m, logp - old_logp, 0.0))
    objective = _surrogate(ratio, adv_nT, cfg)
    kl = None
    if ref_logp is not None:
        kl = kl_divergence(jnp.where(m, logp, 0.0), jnp.where(m, ref_logp, 0.0), cfg.kl_estimator)
        if cfg.beta > 0:
            objective = objective - cfg.beta * kl
    loss = -_aggregate(objective, m, cfg)

    metrics = _loss_metrics(jax.lax.stop_gradient(logp), ratio, adv_n, adv_nT, m, kl, entropy, cfg)
    return loss, metrics


def _loss_metrics(logp, ratio, adv_n, adv_nT, m, kl, entropy, cfg):
    ratio = jax.lax.stop_gradient(ratio)

    def frac(cond):
        return _masked_mean(cond.astype(jnp.float32), m)

    clip_low = (adv_nT < 0) & (ratio < 1.0 - cfg.epsilon_low)
    clip_high = (adv_nT > 0) & (ratio > 1.0 + cfg.epsilon_high)
    if cfg.dual_clip is not None:
        clip_dual = (adv_nT < 0) & (ratio > cfg.dual_clip)
    else:
        clip_dual = jnp.zeros_like(m)
    has_tokens = jnp.any(m)
    valid_n = jnp.any(m, axis=1)
    adv_mean = _masked_mean(adv_n, valid_n)
    ent = _masked_mean(entropy, m) if entropy is not None else -_masked_mean(logp, m)
    return {
        "clip_frac_low": frac(clip_low),
        "clip_frac_high": frac(clip_high),
        "clip_frac_dual": frac(clip_dual),
        "kl": _masked_mean(jax.lax.stop_gradient(kl), m) if kl is not None else jnp.float32(0),
        "entropy": jax.lax.stop_gradient(jnp.asarray(ent, jnp.float32)),
        "ratio_mean": _masked_mean(ratio, m),
        "ratio_min": jnp.where(has_tokens, jnp.min(jnp.where(m, ratio, jnp.inf)), 1.0),
        "ratio_max": jnp.where(has_tokens, jnp.max(jnp.where(m, ratio, -jnp.inf)), 1.0),
        "adv_mean": adv_mean,
        "adv_std": jnp.sqrt(_masked_mean(jnp.square(adv_n - adv_mean), valid_n)),
    }


def groups_with_signal(rewards_bg):
    """DAPO dynamic-sampling filter: True for groups whose rewards are not all equal.

    Args:
        rewards_bg: [b, G] rewards.

    Returns:
        [b] bool; groups marked False have zero advantage and give no policy gradient.
    """
    r = jnp.asarray(rewards_bg)
    return jnp.max(r, axis=1) > jnp.min(r, axis=1)


def overlong_penalty(lengths, max_length, buffer):
    """DAPO's soft overlong punishment, added to the task reward.

    0 up to max_length - buffer tokens, then falls linearly to -1 at max_length, -1 beyond.

    Args:
        lengths: [...] int completion lengths in tokens.
        max_length: L_max (cfg.max_completion_length).
        buffer: L_cache (cfg.overlong_buffer).

    Returns:
        [...] float32 penalties in [-1, 0].
    """
    over = jnp.asarray(lengths, jnp.float32) - (max_length - buffer)
    return -jnp.clip(over / buffer, 0.0, 1.0)


def rollout_metrics(rewards_bg, lengths, truncated):
    """Summary statistics of one rollout batch.

    Args:
        rewards_bg: [b, G] rewards.
        lengths: [b, G] or [n] completion lengths in tokens.
        truncated: [b, G] or [n] bool, True where generation hit the length cap.

    Returns:
        dict of float32 scalars: reward_mean, reward_std (population), length_mean/min/max,
        truncated_frac, and no_signal_group_frac (fraction of groups with all-equal rewards,
        which contribute nothing to the GRPO gradient).
    """
    r = jnp.asarray(rewards_bg, jnp.float32)
    length = jnp.asarray(lengths, jnp.float32)
    return {
        "reward_mean": jnp.mean(r),
        "reward_std": jnp.std(r),
        "length_mean": jnp.mean(length),
        "length_min": jnp.min(length),
        "length_max": jnp.max(length),
        "truncated_frac": jnp.mean(jnp.asarray(truncated, jnp.float32)),
        "no_signal_group_frac": 1.0 - jnp.mean(groups_with_signal(r).astype(jnp.float32)),
    }
