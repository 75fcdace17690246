"""Supervised fine-tuning data: JSONL reasoning traces -> fixed-shape tokens and loss masks.

Each non-blank line of the file is one JSON object, either

* ``{"prompt": str, "completion": str}`` -- e.g. a distilled R1 trace; the model is
  trained on the completion (and an end-of-sequence token after it), not the prompt; or
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` -- a conversation rendered with
  the ChatML template of :func:`~r1jax.data.templates.chat_segments`; the model is trained
  on the assistant turns only.

:func:`read_jsonl` checks every line and names ``file:line`` and the field it expected in
its errors. :func:`encode_example` tokenizes the prompt and the completion separately (as
generation sees them: a prompt, then the model's tokens) and returns the ids with a mask
that is 1 on the target tokens -- what ``training.make_lm_train_step`` takes.
:func:`to_arrays` right-pads (or truncates) to ``[n, seq_len]`` and drops the examples
left without a target token.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Mapping, Optional, Sequence

import numpy as np

from r1jax.data.templates import chat_segments


class SFTDataError(ValueError):
    """A JSONL line that is not a valid SFT example (the message names file:line)."""


_EXPECTED = ("an object with string fields 'prompt' and 'completion', or with a 'messages' "
             "list of {'role', 'content'} objects")


def _check_example(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: expected {_EXPECTED}; got a JSON {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: field 'messages' must be a non-empty list of "
                               f"{{'role', 'content'}} objects; got {messages!r:.80}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise SFTDataError(f"{where}: messages[{i}] must be an object with string fields "
                                   f"'role' and 'content'; got {m!r:.80}")
        try:
            chat_segments(messages)  # roles and order
        except ValueError as e:
            raise SFTDataError(f"{where}: {e}") from None
        if not any(m["role"] == "assistant" for m in messages):
            raise SFTDataError(f"{where}: field 'messages' has no 'assistant' message, so nothing "
                               "to train on")
        return {"messages": messages}
    for field in ("prompt", "completion"):
        if field not in record:
            raise SFTDataError(f"{where}: missing field {field!r}; expected {_EXPECTED}; got keys "
                               f"{sorted(record)}")
        if not isinstance(record[field], str):
            raise SFTDataError(f"{where}: field {field!r} must be a string, got "
                               f"{type(record[field]).__name__}")
    if not record["completion"]:
        raise SFTDataError(f"{where}: field 'completion' is empty, so nothing to train on")
    return {"prompt": record["prompt"], "completion": record["completion"]}


def read_jsonl(path: os.PathLike) -> list[dict]:
    """The examples of a JSONL file, each ``{"prompt", "completion"}`` or ``{"messages"}``.

    Raises ``FileNotFoundError`` for a missing file and :class:`SFTDataError` naming
    ``file:line`` for a line that is not JSON or not an example (or a file with none).
    """
    return [example for _, example in _numbered_examples(path)]


def _numbered_examples(path: os.PathLike) -> list[tuple[int, dict]]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist (expected JSONL: one "
                                "{'prompt', 'completion'} or {'messages'} object per line)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                   f"expected {_EXPECTED}") from None
            examples.append((number, _check_example(record, where)))
    if not examples:
        raise SFTDataError(f"{path}: no examples (the file is empty)")
    return examples


def encode_example(tokenizer, example: Mapping, *, add_bos: bool = False,
                   default_system: Optional[str] = None) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of one example; ``mask[i]`` is 1 when ``ids[i]`` is a target token.

    prompt/completion: ``prompt ids | completion ids + eos`` with the mask on the second
    part. messages: the ChatML pieces, masked on the assistant content and its
    ``<|im_end|>``; an eos follows the last assistant turn unless the tokenizer's eos is
    already its last token (Qwen instruct tokenizers use ``<|im_end|>`` as eos).
    """
    ids = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    mask = [0] * len(ids)
    if "messages" in example:
        for text, trained in chat_segments(example["messages"], default_system=default_system):
            piece = tokenizer.encode(text)
            ids += piece
            mask += [int(trained)] * len(piece)
        last = max(i for i, m in enumerate(mask) if m)
        if example["messages"][-1]["role"] == "assistant" and tokenizer.eos_id is not None \
                and ids[last] != tokenizer.eos_id:
            ids.insert(last + 1, tokenizer.eos_id)
            mask.insert(last + 1, 1)
        return ids, mask
    prompt = tokenizer.encode(example["prompt"]) if example["prompt"] else []
    completion = tokenizer.encode(example["completion"], add_eos=tokenizer.eos_id is not None)
    return ids + prompt + completion, mask + [0] * len(prompt) + [1] * len(completion)


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    examples: int  # kept
    truncated: int  # longer than seq_len, cut on the right
    dropped: int  # no target token left within seq_len
    target_tokens: int  # mask ones over the kept examples (positions >= 1)


def to_arrays(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray, EncodeStats]:
    """Right-pad to ``tokens int32 [n, seq_len]`` and ``mask int32 [n, seq_len]``.

    Longer examples keep their first ``seq_len`` tokens. An example with no target in
    positions ``1..seq_len-1`` (the first token is never predicted) is dropped.
    """
    if seq_len < 2:
        raise ValueError(f"to_arrays: seq_len must be >= 2, got {seq_len}")
    rows, masks, truncated, dropped = [], [], 0, 0
    for ids, mask in encoded:
        truncated += len(ids) > seq_len
        ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
        if not any(mask[1:]):
            dropped += 1
            continue
        rows.append(ids + [pad_id] * (seq_len - len(ids)))
        masks.append(mask + [0] * (seq_len - len(mask)))
    tokens = np.asarray(rows, np.int32).reshape(-1, seq_len)
    mask = np.asarray(masks, np.int32).reshape(-1, seq_len)
    stats = EncodeStats(len(rows), truncated, dropped, int(mask[:, 1:].sum()))
    return tokens, mask, stats


def load_sft_arrays(path: os.PathLike, tokenizer, seq_len: int, *, add_bos: bool = False,
                    default_system: Optional[str] = None
                    ) -> tuple[np.ndarray, np.ndarray, EncodeStats]:
    """:func:`read_jsonl`, :func:`encode_example` each line, :func:`to_arrays`.

    Raises :class:`SFTDataError` when no example has a target token within ``seq_len``,
    and names ``file:line`` when a line cannot be tokenized.
    """
    encoded = []
    for number, example in _numbered_examples(path):
        try:
            encoded.append(encode_example(tokenizer, example, add_bos=add_bos,
                                          default_system=default_system))
        except ValueError as e:
            raise SFTDataError(f"{path}:{number}: cannot tokenize this example: {e}") from None
    tokens, mask, stats = to_arrays(encoded, seq_len, tokenizer.pad_id)
    if stats.examples == 0:
        raise SFTDataError(f"{path}: none of the {len(encoded)} examples has a completion token "
                           f"within seq_len={seq_len}; raise --seq-len")
    return tokens, mask, stats
