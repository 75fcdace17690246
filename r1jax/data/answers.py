"""Final-answer extraction from reference solutions (GSM8K ``#### n``, MATH ``\\boxed{}``).

Pure string functions; the dataset readers use them to store a reference answer next
to each problem, and reward functions can reuse them on model output.
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def extract_gsm8k_answer(answer: str) -> str:
    """The number after the last ``####`` of a GSM8K answer, commas removed.

    ``"... so she has 1,200 left.\\n#### 1,200"`` -> ``"1200"``.  Raises ``ValueError``
    when there is no ``####`` or what follows is not a number.
    """
    if "####" not in answer:
        raise ValueError("expected the answer to end with '#### <number>', found no '####'")
    tail = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if tail.endswith("."):
        tail = tail[:-1]
    if not _NUMBER.fullmatch(tail):
        raise ValueError(f"expected a number after '####', got {tail[:40]!r}")
    return tail


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the ``{...}`` group opening at ``text[start]`` (escapes ``\\{``/``\\}``
    do not count), or ``None`` if it never closes."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched with nesting, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``;
    the brace-less form ``\\boxed 5`` gives ``5``.  Returns ``None`` when there is no
    box or its group is unbalanced.
    """
    starts = [(text.rfind(cmd), cmd) for cmd in ("\\boxed", "\\fbox")]
    pos, cmd = max(starts)
    if pos < 0:
        return None
    i = pos + len(cmd)
    if text.startswith(" ", i):  # "\boxed 5$" form
        m = re.match(r"\s*([^\s$]+)", text[i:])
        return m.group(1) if m else None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    return _balanced_group(text, i)
