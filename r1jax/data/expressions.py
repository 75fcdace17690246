"""Integer arithmetic expression trees: random construction, exact evaluation, printing.

A tree is either a leaf ``int`` or a tuple ``(op, left, right)`` with ``op`` one of
``"+" "-" "*" "/"``.  Trees are built bottom-up by :func:`random_tree`, which only
accepts operations whose result is a non-negative integer, so every intermediate value
is an exact integer and the printed expression evaluates to the recorded value under
ordinary precedence rules (``*`` and ``/`` bind tighter than ``+`` and ``-``,
left-associative).

The procedural tasks in :mod:`r1jax.data.tasks` use these helpers; they hold no
randomness of their own beyond the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

Tree = Union[int, tuple]

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

# A rule decides whether ``a op b`` is allowed (given exact integer values).
OpRule = Callable[[str, int, int], bool]


def apply_op(op: str, a: int, b: int) -> int:
    """Apply ``op`` to integers ``a`` and ``b``; ``/`` must divide exactly."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b != 0:
            raise ValueError(f"apply_op: {a}/{b} is not an exact integer division")
        return a // b
    raise ValueError(f"apply_op: unknown operator {op!r}; expected one of + - * /")


def evaluate(tree: Tree) -> int:
    """Exact integer value of ``tree`` (raises if a division is inexact)."""
    if isinstance(tree, (int, np.integer)):
        return int(tree)
    op, left, right = tree
    return apply_op(op, evaluate(left), evaluate(right))


def _precedence(tree: Tree) -> int:
    return 3 if isinstance(tree, (int, np.integer)) else _PRECEDENCE[tree[0]]


def to_string(tree: Tree) -> str:
    """Print ``tree`` compactly (no spaces) with only the parentheses that are needed.

    A left operand is parenthesised when it binds looser than its parent; a right
    operand also when it binds equally, unless both are ``+`` or both are ``*``
    (``a-(b-c)`` and ``a/(b*c)`` keep their brackets).
    """
    if isinstance(tree, (int, np.integer)):
        return str(int(tree))
    op, left, right = tree
    p = _PRECEDENCE[op]
    left_s = to_string(left)
    if _precedence(left) < p:
        left_s = f"({left_s})"
    right_s = to_string(right)
    rp = _precedence(right)
    if rp < p or (rp == p and not (op in "+*" and right[0] == op)):
        right_s = f"({right_s})"
    return f"{left_s}{op}{right_s}"


def steps(tree: Tree) -> list[str]:
    """Step-by-step evaluation in post-order, e.g. ``["7*3=21", "12+21=33"]``."""
    out: list[str] = []

    def walk(t: Tree) -> int:
        if isinstance(t, (int, np.integer)):
            return int(t)
        op, left, right = t
        a, b = walk(left), walk(right)
        value = apply_op(op, a, b)
        out.append(f"{a}{op}{b}={value}")
        return value

    walk(tree)
    return out


def leaves(tree: Tree) -> list[int]:
    """The integers used by ``tree``, left to right."""
    if isinstance(tree, (int, np.integer)):
        return [int(tree)]
    _, left, right = tree
    return leaves(left) + leaves(right)


def default_rule(max_value: int = 10_000) -> OpRule:
    """Allow ``+``; ``-`` with a non-negative result; ``*`` up to ``max_value``;
    ``/`` only for exact division by a divisor of at least 2."""

    def rule(op: str, a: int, b: int) -> bool:
        if op == "+":
            return a + b <= max_value
        if op == "-":
            return a - b >= 0
        if op == "*":
            return a * b <= max_value
        if op == "/":
            return b >= 2 and a % b == 0
        return False

    return rule


def random_tree(
    rng: np.random.Generator,
    operands: Sequence[int],
    ops: str,
    rule: OpRule,
) -> Tree | None:
    """Combine all ``operands`` into one random tree using operators from ``ops``.

    Repeatedly picks an ordered pair of the remaining sub-trees and an operator that
    ``rule`` accepts for their values.  Returns ``None`` when some step has no allowed
    operator for the drawn pair (the caller redraws).  Uses each operand exactly once.
    """
    if not operands:
        raise ValueError("random_tree: expected at least one operand, got none")
    items: list[tuple[Tree, int]] = [(int(x), int(x)) for x in operands]
    while len(items) > 1:
        i, j = (int(k) for k in rng.choice(len(items), size=2, replace=False))
        (ta, a), (tb, b) = items[i], items[j]
        allowed = [op for op in ops if rule(op, a, b)]
        if not allowed:
            return None
        op = allowed[int(rng.integers(len(allowed)))]
        new = ((op, ta, tb), apply_op(op, a, b))
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [new]
    return items[0][0]
