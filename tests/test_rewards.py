"""Tests for r1jax.rl.rewards: a hand-written table of cases, then robustness properties."""
import random
import threading
import time

import pytest

from r1jax.rl import rewards

FORMAT = rewards.format_reward
ACC = rewards.math_accuracy
COUNTDOWN = rewards.countdown_reward
LANG = rewards.language_consistency_reward
OVERLONG = rewards.overlong_penalty

# math_accuracy's default limit, plus slack for scheduling and killing the helper process.
ACCURACY_LIMIT_S = 2.0 + 1.0
OTHER_LIMIT_S = 1.0

CASES = [
    # --- format
    ("fmt-basic", FORMAT, ("<think>reason</think><answer>42</answer>",), {}, 1.0),
    ("fmt-newlines", FORMAT, ("<think>\nr\n</think>\n<answer>\n42\n</answer>\n",), {}, 1.0),
    ("fmt-think-in-prompt-auto", FORMAT, ("reason</think> <answer>42</answer>",), {}, 1.0),
    ("fmt-think-in-prompt-flag", FORMAT, ("reason</think><answer>42</answer>",),
     {"prompt_has_think": True}, 1.0),
    ("fmt-reopened-think-with-flag", FORMAT, ("<think>r</think><answer>42</answer>",),
     {"prompt_has_think": True}, 0.0),
    ("fmt-text-between", FORMAT, ("<think>r</think> so <answer>42</answer>",), {}, 0.0),
    ("fmt-text-after", FORMAT, ("<think>r</think><answer>42</answer> done",), {}, 0.0),
    ("fmt-wrong-order", FORMAT, ("<answer>42</answer><think>r</think>",), {}, 0.0),
    ("fmt-two-thinks", FORMAT, ("<think>a</think><think>b</think><answer>1</answer>",), {}, 0.0),
    ("fmt-blank-answer", FORMAT, ("<think>r</think><answer>  </answer>",), {}, 0.0),
    ("fmt-no-think-close", FORMAT, ("<think>r<answer>42</answer>",), {}, 0.0),
    ("fmt-no-tags", FORMAT, ("the answer is 42",), {}, 0.0),
    ("fmt-extra-close", FORMAT, ("<think>r</think><answer>1</answer></answer>",), {}, 0.0),
    # --- accuracy
    ("acc-int", ACC, ("<answer>42</answer>", "42"), {}, 1.0),
    ("acc-wrong", ACC, ("<answer>41</answer>", "42"), {}, 0.0),
    ("acc-decimal-vs-fraction", ACC, ("<answer>0.5</answer>", "1/2"), {}, 1.0),
    ("acc-frac-vs-decimal", ACC, ("<answer>\\frac{1}{2}</answer>", "0.5"), {}, 1.0),
    ("acc-boxed-frac", ACC, ("so \\boxed{\\frac{1}{2}}", "1/2"), {}, 1.0),
    ("acc-thousands-dollars", ACC, ("<answer>$1,000$</answer>", "1000"), {}, 1.0),
    ("acc-gsm8k-hashes", ACC, ("She has 1000.\n#### 1,000", "1000"), {}, 1.0),
    ("acc-negative", ACC, ("The total is \\boxed{-7}.", "-7"), {}, 1.0),
    ("acc-sign-wrong", ACC, ("\\boxed{7}", "-7"), {}, 0.0),
    ("acc-sqrt-forms", ACC, ("<answer>\\sqrt{2}/2</answer>", "\\frac{\\sqrt{2}}{2}"), {}, 1.0),
    ("acc-sqrt-wrong", ACC, ("<answer>\\sqrt{3}/2</answer>", "\\frac{\\sqrt{2}}{2}"), {}, 0.0),
    ("acc-polynomial", ACC, ("\\boxed{x^2+1}", "1+x^2"), {}, 1.0),
    ("acc-boxed-in-answer", ACC, ("<answer>it is \\boxed{12}</answer>", "12"), {}, 1.0),
    ("acc-last-boxed", ACC, ("\\boxed{3} no wait \\boxed{5}", "5"), {}, 1.0),
    ("acc-fbox", ACC, ("\\fbox{5}", "5"), {}, 1.0),
    ("acc-trailing-period", ACC, ("<answer>12.</answer>", "12"), {}, 1.0),
    ("acc-no-answer", ACC, ("I think it is 42", "42"), {}, 0.0),
    ("acc-unbalanced-boxed", ACC, ("\\boxed{42", "42"), {}, 0.0),
    ("acc-unclosed-answer", ACC, ("<answer>42", "42"), {}, 0.0),
    ("acc-tuple-not-number", ACC, ("<answer>1, 2</answer>", "12"), {}, 0.0),
    ("acc-reference-is-solution", ACC, ("<answer>72</answer>", "48 + 24 = 72\n#### 72"), {}, 1.0),
    ("acc-malformed-latex", ACC, ("<answer>\\frac{1}{</answer>", "1/2"), {}, 0.0),
    # --- countdown: numbers [3, 5, 7], target 26 = 3 * 7 + 5
    ("cd-correct", COUNTDOWN, ("<answer>3*7+5</answer>", [3, 5, 7], 26), {}, 1.0),
    ("cd-correct-with-equals", COUNTDOWN, ("<answer>(3 * 7) + 5 = 26</answer>", [3, 5, 7], 26),
     {}, 1.0),
    ("cd-reused-number", COUNTDOWN, ("<answer>3*7+5+5-5</answer>", [3, 5, 7], 26), {}, 0.0),
    ("cd-number-not-given", COUNTDOWN, ("<answer>4*7-2</answer>", [3, 5, 7], 26), {}, 0.0),
    ("cd-wrong-value", COUNTDOWN, ("<answer>3*7-5</answer>", [3, 5, 7], 26), {}, 0.0),
    ("cd-wrong-value-format-score", COUNTDOWN, ("<answer>3*7-5</answer>", [3, 5, 7], 26),
     {"format_score": 0.1}, 0.1),
    ("cd-division-by-zero", COUNTDOWN, ("<answer>7/(4-4)</answer>", [4, 4, 7], 26),
     {"format_score": 0.1}, 0.0),
    ("cd-exact-fractions", COUNTDOWN, ("<answer>8/(2/3)</answer>", [2, 3, 8], 12), {}, 1.0),
    ("cd-power", COUNTDOWN, ("<answer>3**7</answer>", [3, 7], 2187), {}, 0.0),
    ("cd-caret", COUNTDOWN, ("<answer>3^7</answer>", [3, 7], 4), {}, 0.0),
    ("cd-function-call", COUNTDOWN, ("<answer>abs(3)+5</answer>", [3, 5], 8), {}, 0.0),
    ("cd-names", COUNTDOWN, ("<answer>__import__('os')</answer>", [3, 5], 8), {}, 0.0),
    ("cd-unary-minus", COUNTDOWN, ("<answer>-3+11</answer>", [3, 11], 8), {}, 0.0),
    ("cd-adjacent-numbers", COUNTDOWN, ("<answer>3 7 + 5</answer>", [3, 5, 7], 26), {}, 0.0),
    ("cd-decimal", COUNTDOWN, ("<answer>2.5*2</answer>", [2, 5], 5), {}, 0.0),
    ("cd-no-answer-tag", COUNTDOWN, ("3*7+5", [3, 5, 7], 26), {}, 0.0),
    ("cd-subset-allowed", COUNTDOWN, ("<answer>3*7+5</answer>", [2, 3, 5, 7], 26), {}, 1.0),
    ("cd-require-all-missing", COUNTDOWN, ("<answer>3*7+5</answer>", [2, 3, 5, 7], 26),
     {"require_all": True}, 0.0),
    ("cd-require-all-ok", COUNTDOWN, ("<answer>3*7+5</answer>", [3, 5, 7], 26),
     {"require_all": True}, 1.0),
    ("cd-numbers-none", COUNTDOWN, ("<answer>3*7+5</answer>", None, 26), {}, 0.0),
    # --- language consistency
    ("lang-english", LANG, ("<think>This is English.</think><answer>5</answer>", "What is 2+3?"),
     {}, 1.0),
    ("lang-chinese-for-english", LANG, ("<think>这是中文</think>", "What is 2+3?"), {}, 0.0),
    ("lang-mixed", LANG, ("<think>abcd中文</think>", "用中文回答"), {}, pytest.approx(1 / 3)),
    ("lang-cyrillic", LANG, ("<think>Привет, мир!</think>", "Привет"), {}, 1.0),
    ("lang-japanese-one-script", LANG, ("<think>ひらがなと漢字</think>", "日本語で答えて"), {}, 1.0),
    ("lang-no-letters", LANG, ("<think>12345 + 678 = ?</think>", "Compute"), {}, 1.0),
    ("lang-prompt-no-letters", LANG, ("<think>x y</think>", "1+1"), {}, 1.0),
    ("lang-think-from-prompt", LANG, ("中文推理</think><answer>five</answer>", "question"), {}, 0.0),
    ("lang-no-tags", LANG, ("plain English, x = 3", "English"), {}, 1.0),
    ("lang-latex-is-markup", LANG, ("<think>所以答案是 \\frac{1}{2}</think>", "计算一半"), {}, 1.0),
    # --- overlong (max 100, buffer 20: penalty starts after 80 tokens)
    ("ovl-short", OVERLONG, (10, 100, 20), {}, 0.0),
    ("ovl-buffer-start", OVERLONG, (80, 100, 20), {}, 0.0),
    ("ovl-in-buffer", OVERLONG, (81, 100, 20), {}, pytest.approx(-0.05)),
    ("ovl-mid-buffer", OVERLONG, (90, 100, 20), {}, -0.5),
    ("ovl-at-max", OVERLONG, (100, 100, 20), {}, -1.0),
    ("ovl-over-max", OVERLONG, (101, 100, 20), {}, -1.0),
    ("ovl-no-buffer", OVERLONG, (100, 100, 0), {}, 0.0),
    ("ovl-no-buffer-over", OVERLONG, (101, 100, 0), {}, -1.0),
]


@pytest.mark.parametrize(
    "fn, args, kwargs, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table(fn, args, kwargs, expected):
    result = fn(*args, **kwargs)
    assert isinstance(result, float)
    assert result == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer> then <answer>2", "1"),
        ("<answer><answer>5</answer></answer>", "5"),
        ("<answer>so \\boxed{7}</answer> \\boxed{8}", "7"),
        ("<answer>  </answer> \\boxed{8}", None),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{1} \\boxed{2", "1"),
        ("\\boxed {3}", "3"),
        ("work\n#### 18\nmore", "18"),
        ("nothing here", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert rewards.extract_answer(completion) == expected


def test_combine_passes_each_reward_its_fields():
    reward_fn = rewards.combine(
        (1.0, rewards.math_accuracy_fn),
        (0.5, rewards.format_reward),
        (0.25, rewards.language_consistency_reward),
        (2.0, lambda completion, length_tokens: OVERLONG(length_tokens, 100, 20)),
    )
    good = "<think>easy</think><answer>\\frac{1}{2}</answer>"
    fields = {"answer": "0.5", "prompt": "Halve one.", "length_tokens": 90, "unused": 1}
    assert reward_fn(good, **fields) == 1.0 + 0.5 + 0.25 - 1.0
    assert reward_fn("easy</think><answer>3</answer>", **fields) == 0.5 + 0.25 - 1.0

    countdown_fn = rewards.combine((1.0, COUNTDOWN))
    assert countdown_fn("<answer>3*7+5</answer>", numbers=[3, 5, 7], target=26, answer="x") == 1.0
    with pytest.raises(TypeError):
        countdown_fn("<answer>3*7+5</answer>", numbers=[3, 5, 7])  # no target: config error
    with pytest.raises(TypeError):
        rewards.combine(rewards.format_reward)


@pytest.fixture(scope="module")
def warm_verifier():
    """Starts the math-verify helper once, so that timed calls measure comparisons only."""
    assert ACC("\\boxed{\\frac{1}{2}}", "0.5") == 1.0


@pytest.mark.parametrize(
    "on_thread, completion",
    [(False, "\\boxed{9^{9^{9^{9}}}}"), (True, "<answer>2^{2^{2^{2^{2^{30}}}}}</answer>")],
    ids=["main-thread", "worker-thread"],
)
def test_time_limit_holds_for_pathological_answers(warm_verifier, on_thread, completion):
    timeout = 0.5
    results = []

    def run():
        start = time.monotonic()
        results.append(ACC(completion, "\\frac{1}{2}", timeout_seconds=timeout))
        results.append(time.monotonic() - start)

    if on_thread:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    else:
        run()
    value, seconds = results
    assert value == 0.0
    assert seconds < timeout + 1.0
    # The replacement helper still answers correctly afterwards.
    assert ACC("<answer>\\frac{\\sqrt{2}}{2}</answer>", "\\sqrt{2}/2") == 1.0


def test_adversarial_inputs_are_fast():
    huge = [
        "<answer>" * 100_000,
        "</answer>" * 100_000,
        "<answer>" * 50_000 + "</answer>" * 50_000,
        "\\boxed{" * 50_000,
        "\\boxed{" * 50_000 + "}",
        "{" * 100_000,
        "}" * 100_000,
        "\\boxed" + " " * 100_000,
        "<think>" * 50_000 + "</think>" * 50_000,
        "####" * 100_000,
        "x" * 1_000_000,
        "<answer>" + "9" * 1_000_000 + "</answer>",
        "<answer>" + "(" * 100_000 + "1" + ")" * 100_000 + "</answer>",
        "<answer>" + "1+" * 300_000 + "1</answer>",
        "<think>" + "中" * 1_000_000 + "</think>",
    ]
    for text in huge:
        for call in (
            lambda: FORMAT(text),
            lambda: ACC(text, "42"),
            lambda: COUNTDOWN(text, [1, 2, 3], 6),
            lambda: LANG(text, text[:1000]),
        ):
            start = time.monotonic()
            assert isinstance(call(), float)
            assert time.monotonic() - start < OTHER_LIMIT_S


FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "\\boxed{", "\\fbox{",
    "{", "}", "\\{", "\\}", "####", "\n", " ", "0", "1", "7", "42", "-", "+", "*", "/", "**", "^",
    "(", ")", "=", ".", ",", "$", "\\", "\\frac{1}{2}", "\\sqrt{2}", "x", "abc", "中文", "Привет",
    "9" * 5000, "1/0", "(" * 500, ")" * 500, "^{9}", "\ud800", "\x00", "🙂",
]


def _random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(40)))
    if kind < 0.3:
        return "".join(rng.choice("0123456789+-*/() ") for _ in range(rng.randrange(40)))
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(30)))


def test_random_and_adversarial_strings_never_raise(warm_verifier):
    rng = random.Random(0)
    references = ["42", "-7", "\\frac{1}{2}", "x^2+1", "\\sqrt{2}"]
    slowest = {}

    def timed(name, limit, fn, *args, **kwargs):
        start = time.monotonic()
        result = fn(*args, **kwargs)
        seconds = time.monotonic() - start
        slowest[name] = max(slowest.get(name, 0.0), seconds)
        assert seconds < limit, (name, args)
        return result

    for _ in range(3000):
        text, prompt = _random_text(rng), _random_text(rng)
        numbers = [rng.randrange(-5, 100) for _ in range(rng.randrange(7))]
        target = rng.choice([rng.randrange(1000), -1, 0, 10**30, 2.5, float("nan")])
        results = [
            timed("format", OTHER_LIMIT_S, FORMAT, text),
            timed("format", OTHER_LIMIT_S, FORMAT, text, prompt_has_think=True),
            timed("accuracy", ACCURACY_LIMIT_S, ACC, text, rng.choice(references)),
            timed("countdown", OTHER_LIMIT_S, COUNTDOWN, text, numbers, target),
            timed("countdown", OTHER_LIMIT_S, COUNTDOWN, text, numbers, target, require_all=True),
            timed("language", OTHER_LIMIT_S, LANG, text, prompt),
            timed("overlong", OTHER_LIMIT_S, OVERLONG, rng.randrange(-10, 10**6),
                  rng.randrange(0, 10**6), rng.randrange(-10, 10**4)),
        ]
        for result in results:
            assert isinstance(result, float)
        answer = timed("extract", OTHER_LIMIT_S, rewards.extract_answer, text)
        assert answer is None or isinstance(answer, str)

    # Garbage field values must not raise either.
    for bad in (None, 3, b"bytes", ["<answer>1</answer>"]):
        assert FORMAT(bad) == 0.0
        assert ACC(bad, "1") == 0.0 and ACC("<answer>1</answer>", bad) == 0.0
        assert COUNTDOWN(bad, [1], 1) == 0.0 and COUNTDOWN("<answer>1</answer>", [1], bad) == 0.0
        assert LANG(bad, "x") == 0.0
        assert OVERLONG(bad, 10, 2) == 0.0
        assert rewards.extract_answer(bad) is None
    assert COUNTDOWN("<answer>1+2</answer>", [1, 2.0, "3", None], 3) == 0.0
    assert COUNTDOWN("<answer>1+2</answer>", [1, 2.0], 3.0) == 1.0
    assert OVERLONG(float("nan"), 10, 2) == 0.0
    assert isinstance(OVERLONG(10**400, 100, 20), float)
