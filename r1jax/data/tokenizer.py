"""Tokenizers with one small interface: a fixed character vocabulary for the built-in
tasks, and a wrapper around any Hugging Face ``tokenizer.json``.

Both expose ``encode(text, add_bos=False, add_eos=False) -> list[int]``,
``decode(ids, skip_special_tokens=True) -> str``, ``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id`` and ``token_to_id(token)``.

``decode`` always drops ``pad_id``; with ``skip_special_tokens=True`` (default) it also
drops ``bos_id`` and ``eos_id``.  It never stops at ``eos`` -- truncating a sampled
sequence at the first ``eos`` is the caller's job.  The reasoning tags stay in the text.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline, space, printable ASCII


class CharTokenizer:
    """Character-level tokenizer for the procedural tasks.

    Vocabulary (103 ids): ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<think>``=3,
    ``</think>``=4, ``<answer>``=5, ``</answer>``=6, then newline, space and the 94
    printable ASCII characters (digits, letters, punctuation, ``+ - * / = ( ) < >``...).
    The four tags are matched greedily in the text and each becomes one token; the
    ``<pad>``/``<bos>``/``<eos>`` strings are *not* recognised in text (they encode
    character by character), so text can never inject control tokens.
    """

    def __init__(self) -> None:
        self._id_to_token = [PAD, BOS, EOS, *TAGS, *CHARS]
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.chat_template = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``max id + 1``)."""
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Id of a single token (a character, a tag or a special token)."""
        if token not in self._token_to_id:
            raise KeyError(f"CharTokenizer: {token!r} is not in the vocabulary")
        return self._token_to_id[token]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; raises ``ValueError`` naming any unsupported character."""
        ids = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            if text[i] == "<":
                tag = next((t for t in TAGS if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self._token_to_id[tag])
                    i += len(tag)
                    continue
            tid = self._token_to_id.get(text[i])
            if tid is None:
                raise ValueError(
                    f"CharTokenizer.encode: character {text[i]!r} at position {i} is not in "
                    f"the vocabulary (expected newline or printable ASCII) in {text[:60]!r}"
                )
            ids.append(tid)
            i += 1
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: pads dropped; bos/eos dropped unless ``skip_special_tokens``
        is False (then rendered as ``<bos>``/``<eos>``)."""
        out = []
        for raw in ids:
            tid = int(raw)
            if not 0 <= tid < self.vocab_size:
                raise ValueError(f"CharTokenizer.decode: id {tid} outside [0, {self.vocab_size})")
            if tid == self.pad_id or (skip_special_tokens and tid in (self.bos_id, self.eos_id)):
                continue
            out.append(self._id_to_token[tid])
        return "".join(out)


def _token_content(value) -> str | None:
    """``tokenizer_config.json`` stores tokens as a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"expected a token string or {{'content': ...}}, got {value!r}")


class HFTokenizer:
    """Wraps a Hugging Face ``tokenizers.Tokenizer`` with the :class:`CharTokenizer`
    interface.

    ``bos_id`` is ``None`` for models without a BOS token (e.g. Qwen2); ``pad_id``
    falls back to ``eos_id`` when no pad token is configured.  ``chat_template`` holds
    the Jinja chat template string from ``tokenizer_config.json`` (not rendered here;
    see :mod:`r1jax.data.templates` for the built-in renderer), and ``chat_templates``
    all named templates when the config lists several.
    """

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template=None, source: str = "<memory>"):
        self.tokenizer = tokenizer
        self.source = source
        self.bos_id = self._lookup(bos_token, "bos_token")
        self.eos_id = self._lookup(eos_token, "eos_token")
        pad = self._lookup(pad_token, "pad_token")
        self.pad_id = pad if pad is not None else self.eos_id
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            self.chat_templates = {t["name"]: t["template"] for t in chat_template}
            self.chat_template = self.chat_templates.get("default")
        else:
            self.chat_templates = {"default": chat_template} if chat_template else {}
            self.chat_template = chat_template

    def _lookup(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(
                f"HFTokenizer ({self.source}): {field} {token!r} is not in the "
                "vocabulary")
        return tid

    @classmethod
    def from_file(cls, path, **overrides) -> "HFTokenizer":
        """Load from a folder holding ``tokenizer.json`` or from the json file itself.

        Reads ``tokenizer_config.json`` next to it, when present, for ``bos_token``,
        ``eos_token``, ``pad_token`` and ``chat_template``; keyword ``overrides`` (same
        names) take precedence.
        """
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"HFTokenizer.from_file: expected a tokenizer.json at {file}")
        settings: dict = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_file}: not valid JSON ({e})") from e
            for field in ("bos_token", "eos_token", "pad_token"):
                try:
                    settings[field] = _token_content(config.get(field))
                except ValueError as e:
                    raise ValueError(f"{config_file}: field {field!r}: {e}") from None
            settings["chat_template"] = config.get("chat_template")
        settings.update(overrides)
        return cls(Tokenizer.from_file(str(file)), source=str(file), **settings)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of a single token of the vocabulary."""
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise KeyError(f"HFTokenizer ({self.source}): {token!r} is not in the vocabulary")
        return tid

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no post-processor specials; ask for bos/eos explicitly)."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos:
            if self.bos_id is None:
                raise ValueError(
                    f"HFTokenizer ({self.source}): add_bos=True but no bos_token is "
                    "set")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError(
                    f"HFTokenizer ({self.source}): add_eos=True but no eos_token is "
                    "set")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: pads dropped; bos/eos dropped unless ``skip_special_tokens``
        is False.  Other added tokens (tags, chat markers) are kept."""
        drop = {self.pad_id}
        if skip_special_tokens:
            drop |= {self.bos_id, self.eos_id}
        kept = [int(i) for i in ids if int(i) not in drop]
        return self.tokenizer.decode(kept, skip_special_tokens=False)
