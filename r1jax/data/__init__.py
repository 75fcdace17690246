"""Data for r1jax: verifiable tasks, tokenizers, prompt templates, TFDS sources, batching.

Modules (TFDS is only imported by :mod:`~r1jax.data.builders` and inside
:func:`load_source`):

* :mod:`~r1jax.data.tasks` -- procedural Countdown and arithmetic examples.
* :mod:`~r1jax.data.expressions` -- integer expression trees used by the tasks.
* :mod:`~r1jax.data.answers` -- GSM8K ``####`` and MATH ``\\boxed{}`` answer extraction.
* :mod:`~r1jax.data.tokenizer` -- :class:`CharTokenizer` and :class:`HFTokenizer`.
* :mod:`~r1jax.data.templates` -- R1-Zero, compact char-level and Qwen chat templates.
* :mod:`~r1jax.data.readers` -- GSM8K / MATH file readers with precise errors.
* :mod:`~r1jax.data.builders` -- TFDS ``array_record`` builders.
* :mod:`~r1jax.data.sources` -- :func:`load_source` and :class:`RecordSource`.
* :mod:`~r1jax.data.iterator` -- deterministic resumable batches, :class:`Position`.
* :mod:`~r1jax.data.padding` -- prompts to right-padded ``int32`` arrays.
"""
from r1jax.data.answers import extract_boxed, extract_gsm8k_answer
from r1jax.data.iterator import Position, epoch_order, iterate
from r1jax.data.padding import pad_token_lists, tokenize_prompts
from r1jax.data.sources import QA_FIELDS, RecordSource, load_source, question_and_answer
from r1jax.data.tasks import TEST_INDEX_OFFSET, arithmetic_example, countdown_example
from r1jax.data.templates import (
    R1_ZERO_TEMPLATE,
    SHORT_TEMPLATE,
    chat_segments,
    r1_completion,
    r1_zero_prompt,
    render_chat,
    short_completion,
    short_prompt,
)
from r1jax.data.tokenizer import CharTokenizer, HFTokenizer

__all__ = [
    "CharTokenizer", "HFTokenizer", "Position", "QA_FIELDS", "R1_ZERO_TEMPLATE", "RecordSource",
    "SHORT_TEMPLATE", "TEST_INDEX_OFFSET", "arithmetic_example", "chat_segments",
    "countdown_example", "epoch_order", "extract_boxed", "extract_gsm8k_answer", "iterate",
    "load_source", "pad_token_lists", "question_and_answer", "r1_completion", "r1_zero_prompt",
    "render_chat", "short_completion", "short_prompt", "tokenize_prompts",
]
