"""Rule-based rewards for R1-style RL, as plain Python functions over strings.

Every reward takes the completion text (plus whatever fields of the example it needs),
returns a float and never raises, whatever the model wrote: garbage, megabyte-long
strings, unbalanced or nested tags. All string scanning is linear-time (``str.find``,
single-pass brace matching, regexes without nested quantifiers), so adversarial input
such as ``"<answer>" * 100_000`` or ``"\\\\boxed{" * 50_000`` costs milliseconds.

``math_accuracy`` compares answers with math-verify (sympy) behind a hard time limit: the
symbolic comparison runs in a helper process that is killed when it overruns (see
``math_accuracy``), so a pathological answer such as ``\\boxed{9^{9^{9^{9}}}}`` cannot
stall training, from any thread.

``combine`` builds the weighted sum a trainer calls as ``reward_fn(completion, **example)``::

    reward_fn = rewards.combine((1.0, rewards.math_accuracy_fn), (0.5, rewards.format_reward))
    reward_fn(completion, answer="1/2", prompt=question)
"""
from __future__ import annotations

import atexit
import inspect
import json
import logging
import operator
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import Callable

_log = logging.getLogger(__name__)

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"

# Answers longer or more deeply bracketed than this are treated as wrong without calling
# math-verify: no real final answer is like that, and math-verify's parsing time grows
# with length and exponentially with nesting ("(" * 20 + "1" + ")" * 20 takes seconds).
_MAX_ANSWER_CHARS = 1000
_MAX_ANSWER_NESTING = 12


# ---------------------------------------------------------------------------------------
# Format


def format_reward(completion: str, prompt_has_think: bool = False) -> float:
    """R1-Zero format reward: 1.0 for ``<think> ... </think> <answer> ... </answer>``.

    The completion must contain exactly one of each of the four tags, in that order,
    with only whitespace before ``<think>``, between ``</think>`` and ``<answer>`` and
    after ``</answer>``; the answer must not be blank (the reasoning may be).

    Templates that end the prompt with ``<think>`` are handled: a completion that does
    not start with ``<think>`` but has exactly one ``</think>`` is checked as if
    ``<think>`` preceded it. With ``prompt_has_think=True`` the opening tag is always
    taken from the prompt, so a completion that opens ``<think>`` again scores 0.0.

    Returns 1.0 or 0.0; 0.0 for non-string input.
    """
    if not isinstance(completion, str):
        return 0.0
    text = completion.lstrip()
    if prompt_has_think or (
        not text.startswith(_THINK_OPEN) and text.count(_THINK_CLOSE) == 1
    ):
        text = _THINK_OPEN + text
    if not text.startswith(_THINK_OPEN):
        return 0.0
    for tag in (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE):
        if text.count(tag) != 1:
            return 0.0
    think_close = text.find(_THINK_CLOSE)
    answer_open = text.find(_ANSWER_OPEN)
    answer_close = text.find(_ANSWER_CLOSE)
    if not think_close < answer_open < answer_close:
        return 0.0
    if text[think_close + len(_THINK_CLOSE):answer_open].strip():
        return 0.0
    if text[answer_close + len(_ANSWER_CLOSE):].strip():
        return 0.0
    if not text[answer_open + len(_ANSWER_OPEN):answer_close].strip():
        return 0.0
    return 1.0


# ---------------------------------------------------------------------------------------
# Answer extraction

_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An escape pair (``\{``, ``\}``, ``\\``) or a bare brace; escapes are skipped when matching.
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


def _answer_block(text: str) -> str | None:
    """Content of the last closed ``<answer>`` block, or None."""
    close = text.rfind(_ANSWER_CLOSE)
    if close == -1:
        return None
    open_ = text.rfind(_ANSWER_OPEN, 0, close)
    if open_ == -1:
        return None
    start = open_ + len(_ANSWER_OPEN)
    # With nested tags the first </answer> after the opening one ends the block.
    return text[start:text.find(_ANSWER_CLOSE, start)]


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` whose braces balance, or None."""
    opens = [m.end() - 1 for m in _BOXED_OPEN.finditer(text)]
    if not opens:
        return None
    # One pass over all braces after the first \boxed, so that many unclosed \boxed{
    # cost linear, not quadratic, time.
    closing = {}
    stack = []
    for m in _BRACE_OR_ESCAPE.finditer(text, opens[0]):
        brace = m.group()
        if brace == "{":
            stack.append(m.start())
        elif brace == "}" and stack:
            closing[stack.pop()] = m.start()
    for start in reversed(opens):
        end = closing.get(start)
        if end is not None:
            return text[start + 1:end]
    return None


def _gsm8k_answer(text: str) -> str | None:
    """Rest of the line after the last ``####``, or None."""
    pos = text.rfind("####")
    if pos == -1:
        return None
    end = text.find("\n", pos)
    return text[pos + 4:end if end != -1 else len(text)].strip() or None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, or None if it gives none.

    In order of preference:

    1. the content of the last closed ``<answer>...</answer>`` block, or the content of
       the last ``\\boxed{}`` inside it when it has one (a blank block gives None, with no
       fallback to the reasoning);
    2. the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces
       (escaped ``\\{``/``\\}`` do not count);
    3. the rest of the line after GSM8K's last ``####``.

    The answer is stripped of surrounding whitespace.
    """
    if not isinstance(completion, str):
        return None
    block = _answer_block(completion)
    if block is not None:
        boxed = _last_boxed(block)
        answer = (boxed if boxed is not None else block).strip()
        return answer or None
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip() or None
    return _gsm8k_answer(completion)


# ---------------------------------------------------------------------------------------
# Math accuracy

_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
_PLAIN_FRACTION = re.compile(r"([+-]?[0-9]+)\s*/\s*([0-9]+)")
_BRACKET = re.compile(r"[(\[{]|[)\]}]")


def _as_number(text: str) -> Fraction | None:
    """Exact value of a plain number (``-3``, ``1,000``, ``$12.50``, ``3/4``), else None."""
    s = text.replace("\\$", "").strip().strip("$").strip()
    if s.endswith("."):
        s = s[:-1]
    # Long digit strings go to math-verify (and would hit int()'s digit limit anyway).
    if not s or len(s) > 100:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s)
    fraction = _PLAIN_FRACTION.fullmatch(s)
    if fraction and int(fraction.group(2)) != 0:
        return Fraction(int(fraction.group(1)), int(fraction.group(2)))
    return None


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for m in _BRACKET.finditer(text):
        if m.group() in "([{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def math_accuracy(completion: str, reference_answer: str, timeout_seconds: float = 2.0) -> float:
    """1.0 if the completion's final answer equals the reference answer, else 0.0.

    The answer is taken with ``extract_answer`` (no answer -> 0.0). The reference may be
    a bare answer (``"1/2"``, ``"\\frac{\\sqrt{2}}{2}"``) or a solution ending in
    ``\\boxed{}``/``#### n``, which is extracted the same way.

    Plain numbers on both sides (``-3``, ``1,000``, ``$5``, ``12.``, ``3/4``) are compared
    exactly in Python. Anything else goes to math-verify, which decides symbolic
    equivalence (``0.5 == 1/2 == \\frac{1}{2}``, ``\\sqrt{2}/2 == \\frac{\\sqrt{2}}{2}``).

    Time limit: math-verify runs in a helper process (started on first use, reused
    afterwards, one per concurrently calling thread); when it has not answered within
    ``timeout_seconds`` it is killed, a replacement is started, and the call returns 0.0.
    This holds on any thread and for sympy work stuck in C code, which signal-based
    timeouts cannot interrupt. Waiting for a helper to finish starting (about a second,
    on first use or after a kill) is not counted against ``timeout_seconds``. Answers
    longer than 1000 characters or with brackets nested more than 12 deep score 0.0
    without math-verify.

    Never raises; returns 0.0 for non-string input or if the helper cannot be started.
    """
    if not isinstance(completion, str) or not isinstance(reference_answer, str):
        return 0.0
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0
    gold = extract_answer(reference_answer) or reference_answer.strip()
    if not gold:
        return 0.0
    predicted_number, gold_number = _as_number(predicted), _as_number(gold)
    if predicted_number is not None and gold_number is not None:
        return float(predicted_number == gold_number)
    for answer in (predicted, gold):
        if len(answer) > _MAX_ANSWER_CHARS or _nesting_depth(answer) > _MAX_ANSWER_NESTING:
            return 0.0
    try:
        timeout = float(timeout_seconds)
        if not timeout > 0:
            return 0.0
        return 1.0 if _verify_with_deadline(gold, predicted, timeout) else 0.0
    except Exception:  # e.g. OSError when no process can be started
        _log.warning("math-verify comparison failed", exc_info=True)
        return 0.0


def math_accuracy_fn(completion: str, answer: str, timeout_seconds: float = 2.0) -> float:
    """``math_accuracy`` reading the reference from an example's ``answer`` field (for
    ``combine``)."""
    return math_accuracy(completion, answer, timeout_seconds)


# The math-verify helper process. The parent writes one JSON request per line to its
# stdin; it answers "1" or "0" per line (after a first "ready" line once math-verify is
# imported). A subprocess running this file (not multiprocessing) is used so that the
# helper never imports the caller's __main__ or JAX, and starting it is fork-safe.

_WORKER_ARG = "--r1jax-math-verify-worker"
_STARTUP_TIMEOUT_SECONDS = 120.0
# Inside the helper a SIGALRM interrupts math-verify at this fraction of the deadline, so
# slow pure-Python sympy work usually ends without a kill and restart.
_SOFT_DEADLINE_FRACTION = 0.8


class _VerifierProcess:
    """Parent-side handle on one math-verify helper process."""

    def __init__(self) -> None:
        command = [sys.executable]
        if sys.version_info >= (3, 11):
            command.append("-P")  # keep this file's directory off the helper's sys.path
        command += [os.path.abspath(__file__), _WORKER_ARG]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self._pending = b""
        self.ready = False

    def _read_line(self, deadline: float) -> str | None:
        fd = self._process.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the helper exited
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("ascii", "replace")

    def wait_ready(self) -> bool:
        if not self.ready:
            self.ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_SECONDS) == "ready"
        return self.ready

    def compare(self, gold: str, predicted: str, timeout: float) -> bool | None:
        """True/False from math-verify, or None if the helper missed the deadline or died."""
        deadline = time.monotonic() + timeout
        request = json.dumps(
            {"gold": gold, "pred": predicted, "soft": timeout * _SOFT_DEADLINE_FRACTION}
        )
        data = (request + "\n").encode("ascii")
        fd = self._process.stdin.fileno()
        while data:
            data = data[os.write(fd, data):]
        reply = self._read_line(deadline)
        return None if reply is None else reply == "1"

    def kill(self) -> None:
        self._selector.close()
        self._process.kill()
        self._process.wait()
        self._process.stdin.close()
        self._process.stdout.close()


_idle_verifiers: list[_VerifierProcess] = []
_idle_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child must not share the parent's helpers (their pipes would interleave).
    global _idle_verifiers, _idle_lock
    _idle_verifiers = []
    _idle_lock = threading.Lock()


def _kill_idle_verifiers() -> None:
    with _idle_lock:
        while _idle_verifiers:
            _idle_verifiers.pop().kill()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(_kill_idle_verifiers)


def _verify_with_deadline(gold: str, predicted: str, timeout: float) -> bool:
    with _idle_lock:
        verifier = _idle_verifiers.pop() if _idle_verifiers else None
    if verifier is None:
        verifier = _VerifierProcess()
    try:
        if not verifier.wait_ready():
            _log.warning("the math-verify helper process did not start; is math-verify installed?")
            verifier.kill()
            return False
        result = verifier.compare(gold, predicted, timeout)
    except BaseException:
        verifier.kill()
        raise
    if result is None:
        verifier.kill()
        verifier = _VerifierProcess()  # starts importing now, ready by the next call
        result = False
    with _idle_lock:
        _idle_verifiers.append(verifier)
    return result


def _serve_math_verify() -> None:
    """Helper-process main loop (runs when this file is executed with ``_WORKER_ARG``)."""
    import signal

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the reply channel
    logging.disable(logging.CRITICAL)
    from math_verify import parse, verify

    class SoftTimeout(Exception):
        pass

    def on_alarm(signum, frame):
        raise SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def as_latex(answer: str) -> str:
        return answer if "$" in answer else f"${answer}$"

    def equivalent(gold: str, predicted: str) -> bool:
        # math-verify's own signal timeouts are off: the parent enforces the deadline.
        gold_parsed = parse(as_latex(gold), parsing_timeout=None)
        predicted_parsed = parse(as_latex(predicted), parsing_timeout=None)
        return bool(gold_parsed and predicted_parsed) and verify(
            gold_parsed, predicted_parsed, timeout_seconds=None
        )

    equivalent("\\frac{1}{2}", "0.5")  # builds the LaTeX grammar before reporting ready
    replies.write("ready\n")
    for line in sys.stdin:
        try:
            request = json.loads(line)
            try:
                signal.setitimer(signal.ITIMER_REAL, request["soft"])
                ok = equivalent(request["gold"], request["pred"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Exception:
            ok = False
        replies.write("1\n" if ok else "0\n")


# ---------------------------------------------------------------------------------------
# Countdown

_COUNTDOWN_CHARS = re.compile(r"[0-9\s+\-*/()]*")
_COUNTDOWN_TOKEN = re.compile(r"[0-9]+|[-+*/()]")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _evaluate_arithmetic(tokens: list[str]) -> Fraction | None:
    """Exact value of an infix expression of integers, binary + - * / and parentheses.

    Iterative shunting-yard, so deep nesting cannot overflow the stack. None for a
    malformed expression (unary or doubled operators, unbalanced or empty parentheses)
    or a division by zero.
    """
    values: list[Fraction] = []
    ops: list[str] = []

    def apply() -> bool:
        right, left, op = values.pop(), values.pop(), ops.pop()
        if op == "+":
            values.append(left + right)
        elif op == "-":
            values.append(left - right)
        elif op == "*":
            values.append(left * right)
        elif right == 0:
            return False
        else:
            values.append(left / right)
        return True

    expect_operand = True
    for token in tokens:
        if token[0] in "0123456789":
            if not expect_operand:
                return None
            values.append(Fraction(int(token)))
            expect_operand = False
        elif token == "(":
            if not expect_operand:
                return None
            ops.append(token)
        elif token == ")":
            if expect_operand:
                return None
            while ops and ops[-1] != "(":
                if not apply():
                    return None
            if not ops:
                return None
            ops.pop()
        else:
            if expect_operand:
                return None
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[token]:
                if not apply():
                    return None
            ops.append(token)
            expect_operand = True
    if expect_operand:
        return None
    while ops:
        if ops[-1] == "(" or not apply():
            return None
    return values[0]


def _as_exact(value) -> Fraction | None:
    """An integer-like or finite float value as a Fraction (numpy scalars included)."""
    if isinstance(value, bool):
        return None
    try:
        return Fraction(operator.index(value))
    except TypeError:
        pass
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return Fraction(value)
    return None


def countdown_reward(
    completion: str,
    numbers: list[int],
    target: int,
    require_all: bool = False,
    format_score: float = 0.0,
) -> float:
    """TinyZero's Countdown reward: 1.0 if the answer's equation reaches ``target``.

    The equation is ``extract_answer(completion)`` (normally the ``<answer>`` content);
    if it contains ``=``, only the left side counts (``"(3 + 5) * 2 = 16"``). It may use
    non-negative integers, binary ``+ - * /`` and parentheses; no unary minus, ``**``,
    ``^``, decimals, names or calls. Its integers must be a sub-multiset of ``numbers``
    (each given number used at most once; exactly once each with ``require_all=True``).
    It is evaluated exactly with a small parser of its own (never ``eval``) and must
    equal ``target`` within 1e-6.

    Returns 1.0 if correct; ``format_score`` if the equation is well-formed and uses
    valid numbers but has another value; 0.0 otherwise (no answer, bad syntax, numbers
    not given or reused, division by zero, invalid ``numbers``/``target``).
    """
    try:
        given = [_as_exact(n) for n in numbers]
    except TypeError:  # numbers is not iterable
        return 0.0
    goal = _as_exact(target)
    if goal is None or any(n is None or n.denominator != 1 for n in given):
        return 0.0
    equation = extract_answer(completion)
    if equation is None:
        return 0.0
    expression = equation.split("=", 1)[0]
    if not _COUNTDOWN_CHARS.fullmatch(expression):
        return 0.0
    tokens = _COUNTDOWN_TOKEN.findall(expression)
    operands = [t for t in tokens if t[0] in "0123456789"]
    # Longer literals cannot be among the given numbers; skip converting them.
    if not operands or any(len(t) > 50 for t in operands):
        return 0.0
    used = Counter(int(t) for t in operands)
    available = Counter(int(n) for n in given)
    if require_all and used != available:
        return 0.0
    if used - available:
        return 0.0
    value = _evaluate_arithmetic(tokens)
    if value is None:
        return 0.0
    if abs(value - goal) <= Fraction(1, 10**6):
        return 1.0
    return float(format_score)


# ---------------------------------------------------------------------------------------
# Language consistency

# Tags and LaTeX commands (\\frac, \\sqrt) are markup, not words of any language.
_MARKUP = re.compile(r"</?(?:think|answer)>|\\[A-Za-z]+")
# Hiragana, katakana and Han characters are one writing system here (Japanese mixes them).
_CJK_SCRIPTS = frozenset({"CJK", "HIRAGANA", "KATAKANA"})


def _script(char: str) -> str | None:
    """Script of a letter from its Unicode name (``LATIN``, ``CJK``, ``CYRILLIC``,
    ``ARABIC``, ``HANGUL``, ...), or None for non-letters and math letters."""
    if not char.isalpha():
        return None
    code = ord(char)
    # Letterlike symbols (ℝ, ℓ) and mathematical alphanumerics (𝑥) are notation.
    if 0x2100 <= code <= 0x214F or 0x1D400 <= code <= 0x1D7FF:
        return None
    name = unicodedata.name(char, "")
    for width in ("FULLWIDTH ", "HALFWIDTH "):
        if name.startswith(width):
            name = name[len(width):]
    script = name.split(" ", 1)[0]
    if not script or script == "MODIFIER":
        return None
    return "CJK" if script in _CJK_SCRIPTS else script


def _script_counts(text: str) -> Counter:
    counts: Counter = Counter()
    for char, n in Counter(text).items():
        script = _script(char)
        if script is not None:
            counts[script] += n
    return counts


def language_consistency_reward(completion: str, prompt: str) -> float:
    """DeepSeek-R1's language-consistency reward: share of the reasoning's letters that
    are in the prompt's dominant script.

    The reasoning is the text between ``<think>`` and the first ``</think>`` (from the
    start of the completion when ``<think>`` was in the prompt); when there is no
    ``</think>`` it is the whole completion. ``<think>``/``<answer>`` tags and LaTeX
    commands (``\\frac``) are ignored.
    Letters are classified by script from their Unicode names (LATIN, CJK, CYRILLIC,
    ARABIC, HANGUL, GREEK, ...; Han, hiragana and katakana count as one script, CJK);
    digits, punctuation, whitespace, math symbols and math letters do not count.

    Pass the user's question as ``prompt``, not the whole templated prompt: an English
    system template would otherwise make LATIN dominant for every question.

    Returns a value in [0, 1]; 1.0 when the prompt or the reasoning has no letters
    (nothing to be inconsistent with), and for non-string input 0.0.
    """
    if not isinstance(completion, str) or not isinstance(prompt, str):
        return 0.0
    close = completion.find(_THINK_CLOSE)
    if close == -1:
        reasoning = completion
    else:
        open_ = completion.rfind(_THINK_OPEN, 0, close)
        reasoning = completion[open_ + len(_THINK_OPEN) if open_ != -1 else 0:close]
    prompt_counts = _script_counts(prompt)
    reasoning_counts = _script_counts(_MARKUP.sub(" ", reasoning))
    if not prompt_counts or not reasoning_counts:
        return 1.0
    dominant = prompt_counts.most_common(1)[0][0]
    return reasoning_counts[dominant] / sum(reasoning_counts.values())


# ---------------------------------------------------------------------------------------
# Length


def overlong_penalty(length_tokens: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), in tokens.

    0 up to ``max_length - cache_length`` tokens, then falling linearly to -1 at
    ``max_length`` over the last ``cache_length`` tokens, and -1 beyond ``max_length``.
    Add it to the task reward. Returns 0.0 for non-numeric or NaN arguments.
    """
    try:
        length, limit, buffer = float(length_tokens), float(max_length), float(cache_length)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if length != length or limit != limit or buffer != buffer:
        return 0.0
    if length > limit:
        return -1.0
    start = limit - buffer
    if length <= start:
        return 0.0
    return (start - length) / buffer  # buffer > 0 here, as start < length <= limit


# ---------------------------------------------------------------------------------------
# Combination


def combine(*weighted: tuple[float, Callable[..., float]]) -> Callable[..., float]:
    """Weighted sum of rewards: ``combine((w1, f1), (w2, f2), ...)``.

    Returns ``reward(completion, **fields) = sum(w * f(completion, **own_fields))``, where
    ``fields`` are the example's fields (e.g. ``answer``, ``numbers``, ``target``,
    ``prompt``) and each ``f`` receives only those named like its parameters after the
    first (all of them if it takes ``**kwargs``). Every reward in this module fits:
    ``countdown_reward`` reads ``numbers``/``target``, ``language_consistency_reward``
    reads ``prompt``, ``format_reward`` reads ``prompt_has_think`` if present, and
    ``math_accuracy_fn`` reads ``answer``. Others can be adapted with a lambda, e.g.
    ``lambda completion, length_tokens: overlong_penalty(length_tokens, 4096, 512)``.

    A field a component requires but the example lacks raises ``TypeError`` (a
    configuration error, not a model error).
    """
    components = []
    for item in weighted:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"combine() takes (weight, reward_fn) pairs, got {item!r}")
        weight, fn = float(item[0]), item[1]
        parameters = list(inspect.signature(fn).parameters.values())
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        names = frozenset(
            p.name for p in parameters[1:]
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        components.append((weight, fn, takes_all, names))

    def reward(completion: str, **fields) -> float:
        total = 0.0
        for weight, fn, takes_all, names in components:
            own = fields if takes_all else {k: v for k, v in fields.items() if k in names}
            total += weight * float(fn(completion, **own))
        return total

    return reward


if __name__ == "__main__" and _WORKER_ARG in sys.argv[1:]:
    _serve_math_verify()
