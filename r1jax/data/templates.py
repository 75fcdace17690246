"""Prompt templates: DeepSeek-R1-Zero, a compact one for char-level tasks, Qwen chat.

* :func:`r1_zero_prompt` -- the DeepSeek-R1-Zero training template, verbatim from the
  DeepSeek-R1 paper (arXiv:2501.12948, Table 1), with ``prompt`` replaced by the
  question.  The model is expected to continue with
  ``<think> ... </think> <answer> ... </answer>``.
* :func:`short_prompt` -- the template for the char-level built-in tasks:
  ``"{question} <think>"``, e.g. ``"What is 12+7? <think>"`` (15 char tokens, since
  ``<think>`` is one token).  The opening tag is part of the prompt so a tiny model
  only has to produce ``12+7=19</think><answer>19</answer>`` and stop; rewards that
  check the format should therefore look at ``"<think>" + completion``.  See
  :func:`short_completion` for the matching target text used to pretrain / SFT.
* :func:`render_chat` / :func:`chat_segments` -- Qwen-style ChatML
  (``<|im_start|>role\\n...<|im_end|>\\n``) for SFT on chat data.
"""
from __future__ import annotations

from typing import Mapping, Sequence

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
"""DeepSeek-R1-Zero template (arXiv:2501.12948, Table 1); ``{prompt}`` is the question."""

SHORT_TEMPLATE = "{question} <think>"
"""Compact template for the char-level tasks; the completion starts inside ``<think>``."""

CHAT_ROLES = ("system", "user", "assistant")


def r1_zero_prompt(question: str) -> str:
    """The DeepSeek-R1-Zero prompt for ``question`` (ends with ``"Assistant:"``)."""
    return R1_ZERO_TEMPLATE.replace("{prompt}", question.strip())


def short_prompt(question: str) -> str:
    """The compact char-level prompt, e.g. ``"What is 12+7? <think>"``."""
    return SHORT_TEMPLATE.replace("{question}", question.strip())


def short_completion(reasoning: str, answer: str) -> str:
    """Target continuation of :func:`short_prompt`:
    ``"{reasoning}</think><answer>{answer}</answer>"`` (append eos when tokenizing)."""
    return f"{reasoning}</think><answer>{answer}</answer>"


def r1_completion(reasoning: str, answer: str) -> str:
    """Target continuation of :func:`r1_zero_prompt` in the paper's format:
    ``" <think> {reasoning} </think> <answer> {answer} </answer>"``."""
    return f" <think> {reasoning} </think> <answer> {answer} </answer>"


def chat_segments(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    default_system: str | None = None,
) -> list[tuple[str, bool]]:
    """Qwen ChatML split into ``(text, is_assistant_output)`` pieces for SFT loss masks.

    Each message renders as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.  For an
    assistant message the pieces ``"{content}<|im_end|>"`` are flagged ``True`` (the
    tokens to train on); everything else is ``False``.  ``default_system`` is inserted
    as a system message when the conversation does not start with one (Qwen2 uses
    ``"You are a helpful assistant."``).  ``add_generation_prompt`` appends
    ``<|im_start|>assistant\\n``.  Tokenize pieces one by one and concatenate to get ids
    and a matching mask (ChatML markers are special tokens, so boundaries are stable).
    """
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(
                f"chat message {i}: expected a mapping with 'role' and 'content', got "
                f"{m!r}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(
                f"chat message {i}: role must be one of {CHAT_ROLES}, got "
                f"{m['role']!r}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"chat message {i}: a system message is only allowed first")
    if default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": default_system})
    pieces: list[tuple[str, bool]] = []
    for m in msgs:
        pieces.append((f"<|im_start|>{m['role']}\n", False))
        if m["role"] == "assistant":
            pieces.append((f"{m['content']}<|im_end|>", True))
            pieces.append(("\n", False))
        else:
            pieces.append((f"{m['content']}<|im_end|>\n", False))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def render_chat(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    default_system: str | None = None,
) -> str:
    """Qwen ChatML text of ``messages`` (see :func:`chat_segments` for the options)."""
    return "".join(text for text, _ in chat_segments(
        messages, add_generation_prompt=add_generation_prompt, default_system=default_system))
