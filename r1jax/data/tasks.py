"""Procedurally generated, verifiable reasoning tasks.

Every generator is a pure function of ``(seed, index, options)``: example ``i`` is
identical on every machine, because its randomness comes from a
``numpy.random.Generator`` (PCG64) seeded with the integer list
``[seed, task_tag, index]``.  Splits are made disjoint by index range: the TFDS
builders use indices ``[0, num_train)`` for train and indices from
:data:`TEST_INDEX_OFFSET` upward for test (skipping any question already in train).

Two task families:

* **Countdown** (TinyZero): combine 3-4 numbers with ``+ - * /`` (each number exactly
  once, exact integer intermediate results) to reach a target.  The target is reachable
  by construction: a random expression over the numbers is drawn and its value becomes
  the target; ``solution`` holds that expression.
* **Arithmetic**: ``kind="expression"`` gives "What is 12+7?"-style questions,
  ``kind="word"`` gives short word problems ("Tom has 12 apples. He buys 5 more. ...").
  ``difficulty`` is the number of operations; operand size grows with it and ``*``
  (difficulty >= 3) and exact ``/`` (difficulty >= 5) are added.  Difficulty 1 with
  ``kind="expression"`` is the very easy family for the from-scratch char-level demo:
  ``"What is 12+7?"`` -> solution ``"12+7=19"``, answer ``"19"``.

Examples are plain dicts with exactly the keys listed in :func:`countdown_example` and
:func:`arithmetic_example`, the same keys the TFDS builders store.
"""
from __future__ import annotations

import numpy as np

from r1jax.data import expressions

TEST_INDEX_OFFSET = 2**40
"""First index used for test-split examples; train uses indices below it."""

_COUNTDOWN_TAG = 0xC0D
_ARITHMETIC_TAG = 0xA21
_MAX_ATTEMPTS = 10_000

ARITHMETIC_KINDS = ("expression", "word")


def _rng(seed: int, tag: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    return np.random.default_rng([int(seed), tag, int(index)])


# --------------------------------------------------------------------------- countdown


def countdown_question(numbers: list[int], target: int) -> str:
    """The short natural-language Countdown question for ``numbers`` and ``target``."""
    nums = ", ".join(str(n) for n in numbers)
    return f"Make {target} from {nums} using + - * / and each number once."


def countdown_example(
    seed: int,
    index: int,
    *,
    min_count: int = 3,
    max_count: int = 4,
    min_value: int = 1,
    max_value: int = 99,
    min_target: int = 1,
    max_target: int = 100,
) -> dict:
    """Countdown example ``index`` of the stream ``seed``.

    Draws ``min_count..max_count`` numbers in ``min_value..max_value`` and a random
    expression using each exactly once (intermediate results are non-negative integers,
    ``/`` divides exactly); retries until its value lies in ``min_target..max_target``.

    Returns:
        ``{"numbers": list[int], "target": int, "solution": str, "question": str}``;
        ``solution`` (e.g. ``"(3+5)*2"``) evaluates to ``target``.
    """
    if not 1 <= min_count <= max_count:
        raise ValueError(
            f"countdown: need 1 <= min_count <= max_count, got {min_count}, "
            f"{max_count}")
    if not 0 <= min_value <= max_value:
        raise ValueError(
            f"countdown: need 0 <= min_value <= max_value, got {min_value}, "
            f"{max_value}")
    if min_target > max_target:
        raise ValueError(f"countdown: min_target {min_target} > max_target {max_target}")
    rng = _rng(seed, _COUNTDOWN_TAG, index)
    rule = expressions.default_rule(max_value=max(10_000, max_target))
    for _ in range(_MAX_ATTEMPTS):
        count = int(rng.integers(min_count, max_count + 1))
        numbers = [int(x) for x in rng.integers(min_value, max_value + 1, size=count)]
        for _ in range(20):  # a few expressions per number draw before redrawing numbers
            tree = expressions.random_tree(rng, numbers, "+-*/", rule)
            if tree is None:
                continue
            target = expressions.evaluate(tree)
            if min_target <= target <= max_target:
                return {
                    "numbers": numbers,
                    "target": target,
                    "solution": expressions.to_string(tree),
                    "question": countdown_question(numbers, target),
                }
    raise RuntimeError(
        f"countdown: no expression with target in [{min_target}, {max_target}] after "
        f"{_MAX_ATTEMPTS} draws (seed={seed}, index={index}); widen the target range"
    )


# -------------------------------------------------------------------------- arithmetic

_NAMES = (("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"),
          ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Zoe", "she"))
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "cards")
_ADD = ("{P} buys {x} more.", "{P} finds {x} more.", "{P} gets {x} more.")
_SUB = ("{P} gives away {x}.", "{P} loses {x}.", "{P} uses {x}.")
_MUL = ("{P} buys {x} boxes with {y} {item} each.", "{P} gets {x} bags with {y} {item} each.")


def arithmetic_limits(difficulty: int) -> tuple[int, str]:
    """``(max_operand, operators)`` for a difficulty: 2-digit operands and ``+ -`` at
    difficulty 1-2, 3-digit operands and ``*`` from 3, 4-digit and exact ``/`` from 5."""
    if difficulty < 1:
        raise ValueError(f"arithmetic: difficulty must be >= 1, got {difficulty}")
    digits = 1 + (difficulty + 1) // 2
    ops = "+-" if difficulty <= 2 else ("+-*" if difficulty <= 4 else "+-*/")
    return 10**digits - 1, ops


def _arith_rule(max_operand: int) -> expressions.OpRule:
    base = expressions.default_rule(max_value=10 * (max_operand + 1))

    def rule(op: str, a: int, b: int) -> bool:
        if op in "*/" and b > 12:  # keep products and quotients mental-arithmetic sized
            return False
        return base(op, a, b)

    return rule


def _expression_problem(rng: np.random.Generator, difficulty: int) -> tuple[str, str, str]:
    max_operand, ops = arithmetic_limits(difficulty)
    rule = _arith_rule(max_operand)
    for _ in range(_MAX_ATTEMPTS):
        operands = [int(x) for x in rng.integers(1, max_operand + 1, size=difficulty + 1)]
        if "*" in ops:  # some small operands, so that * and / actually get drawn
            small = rng.random(difficulty + 1) < 0.4
            operands = [int(rng.integers(2, 13)) if s else x for s, x in zip(small, operands)]
        tree = expressions.random_tree(rng, operands, ops, rule)
        if tree is not None:
            value = expressions.evaluate(tree)
            return (f"What is {expressions.to_string(tree)}?", ", ".join(expressions.steps(tree)),
                    str(value))
    raise RuntimeError(f"arithmetic: could not draw an expression at difficulty {difficulty}")


def _word_problem(rng: np.random.Generator, difficulty: int) -> tuple[str, str, str]:
    max_operand, ops = arithmetic_limits(difficulty)
    name, pronoun = _NAMES[int(rng.integers(len(_NAMES)))]
    item = _ITEMS[int(rng.integers(len(_ITEMS)))]
    total = int(rng.integers(2, max_operand + 1))
    sentences = [f"{name} has {total} {item}."]
    work: list[str] = []
    for _ in range(difficulty):
        choices = ["+"] + (["-"] if total >= 3 else []) + (["*"] if "*" in ops else [])
        kind = choices[int(rng.integers(len(choices)))]
        if kind == "*":
            x, y = (int(v) for v in rng.integers(2, 13, size=2))
            template = _MUL[int(rng.integers(len(_MUL)))]
            work += [f"{x}*{y}={x * y}", f"{total}+{x * y}={total + x * y}"]
            total += x * y
            sentences.append(template.format(P=pronoun.capitalize(), x=x, y=y, item=item))
            continue
        if kind == "+":
            x = int(rng.integers(2, max_operand + 1))
            template, new = _ADD[int(rng.integers(len(_ADD)))], total + x
        else:
            x = int(rng.integers(2, total + 1))
            template, new = _SUB[int(rng.integers(len(_SUB)))], total - x
        work.append(f"{total}{kind}{x}={new}")
        total = new
        sentences.append(template.format(P=pronoun.capitalize(), x=x))
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), ", ".join(work), str(total)


def arithmetic_example(
    seed: int, index: int, difficulty: int = 1, kind: str = "expression"
) -> dict:
    """Arithmetic example ``index`` of the stream ``seed`` at ``difficulty``.

    ``difficulty`` is the number of operations (see :func:`arithmetic_limits` for the
    operand sizes and operators).  ``kind`` is ``"expression"`` ("What is 12+7?") or
    ``"word"`` (a short story problem).  All results are non-negative integers.

    Returns:
        ``{"question": str, "answer": str, "difficulty": int, "solution": str}`` where
        ``answer`` is the integer result as a string and ``solution`` the worked steps,
        e.g. ``"7*3=21, 12+21=33"`` (usable as a short reasoning trace).
    """
    if kind not in ARITHMETIC_KINDS:
        raise ValueError(f"arithmetic: kind must be one of {ARITHMETIC_KINDS}, got {kind!r}")
    arithmetic_limits(difficulty)  # validates difficulty
    rng = _rng(seed, _ARITHMETIC_TAG + (0 if kind == "expression" else 1), index)
    make = _expression_problem if kind == "expression" else _word_problem
    question, solution, answer = make(rng, difficulty)
    return {"question": question, "answer": answer, "difficulty": int(difficulty),
            "solution": solution}
