"""Prompts to fixed-shape arrays: right-padded ``int32 [b, P]`` plus ``lengths [b]``.

A fixed ``max_len`` keeps array shapes (and so compiled JAX programs) the same from
batch to batch.  Prompts longer than ``max_len`` are refused with an error naming the
prompt, unless ``truncate="left"`` asks to keep their last ``max_len`` tokens (the end
of a prompt -- e.g. ``"Assistant:"`` or ``"<think>"`` -- is what generation continues).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TRUNCATE_MODES = ("error", "left")


def pad_token_lists(
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    max_len: int | None = None,
    truncate: str = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id lists into ``(tokens int32 [b, P], lengths int32 [b])``.

    ``P`` is ``max_len`` when given, else the longest list.  With ``truncate="error"``
    a list longer than ``max_len`` raises ``ValueError``; with ``"left"`` it keeps its
    last ``max_len`` ids.  Empty lists are refused (generation needs a first token).
    """
    if truncate not in TRUNCATE_MODES:
        raise ValueError(
            f"pad_token_lists: truncate must be one of {TRUNCATE_MODES}, got "
            f"{truncate!r}")
    if len(token_lists) == 0:
        raise ValueError("pad_token_lists: expected at least one prompt, got none")
    for i, ids in enumerate(token_lists):
        if len(ids) == 0:
            raise ValueError(f"pad_token_lists: prompt {i} is empty")
    longest = max(len(ids) for ids in token_lists)
    width = longest if max_len is None else int(max_len)
    if width < 1:
        raise ValueError(f"pad_token_lists: max_len must be >= 1, got {max_len}")
    tokens = np.full((len(token_lists), width), pad_id, dtype=np.int32)
    lengths = np.zeros((len(token_lists),), dtype=np.int32)
    for i, ids in enumerate(token_lists):
        if len(ids) > width:
            if truncate == "error":
                raise ValueError(
                    f"pad_token_lists: prompt {i} has {len(ids)} tokens, more than "
                    f"max_len={width}; "
                    f"raise max_len or pass truncate='left'")
            ids = ids[len(ids) - width:]
        tokens[i, :len(ids)] = np.asarray(ids, dtype=np.int32)
        lengths[i] = len(ids)
    return tokens, lengths


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    max_len: int | None = None,
    *,
    add_bos: bool = False,
    truncate: str = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``prompts`` with ``tokenizer`` and right-pad with ``tokenizer.pad_id``.

    Returns ``(tokens int32 [b, P], prompt_lengths int32 [b])``; see
    :func:`pad_token_lists` for ``max_len`` and ``truncate``.  Errors for too-long
    prompts quote the start of the offending prompt.
    """
    encoded = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    for i, (text, ids) in enumerate(zip(prompts, encoded)):
        if not ids or (max_len is not None and truncate == "error" and len(ids) > max_len):
            raise ValueError(
                f"tokenize_prompts: prompt {i} ({text[:60]!r}) has {len(ids)} tokens; expected "
                f"1..max_len={max_len} (raise max_len or pass truncate='left')")
    return pad_token_lists(encoded, tokenizer.pad_id, max_len=max_len, truncate=truncate)
