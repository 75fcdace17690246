"""Readers for the published GSM8K and MATH files placed in a ``manual_dir``.

Plain generators of ``(key, example)`` pairs -- no TFDS involved -- so they can be
tested and reused directly; :mod:`r1jax.data.builders` wraps them.  Every error names
the file (and line or row) and the field that was expected.

Accepted layouts:

* **GSM8K** (github.com/openai/grade-school-math): ``{manual_dir}/train.jsonl`` and
  ``test.jsonl``, one ``{"question", "answer"}`` object per line with the answer
  ending in ``#### <number>``; or Hugging Face parquet shards
  ``{manual_dir}/train-*.parquet`` / ``test-*.parquet`` with the same columns.
* **MATH** (Hendrycks et al.): the released tree ``{manual_dir}/[MATH/]train/<subject>/
  <n>.json`` (one ``{"problem", "level", "type", "solution"}`` object per file); or any
  ``train*.jsonl`` / ``train*.parquet`` (``train.jsonl``, ``train-00000-of-00001.parquet``
  ...) anywhere below ``manual_dir`` with those fields.  ``subject`` is accepted for
  ``type`` and an explicit ``answer`` field (as in MATH-500) is used as given, otherwise
  the answer is the last ``\\boxed{...}`` of the solution.
"""
from __future__ import annotations

import json
import pathlib
from typing import Iterator

from r1jax.data.answers import extract_boxed, extract_gsm8k_answer


def read_records(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` for each object in a ``.jsonl``, ``.json`` or ``.parquet``
    file; ``location`` is ``"file:line N"`` / ``"file:row N"`` / ``"file"``."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:line {n}"
                yield where, _as_object(_loads(line, where), where)
    elif path.suffix == ".json":
        data = _loads(path.read_text(encoding="utf-8"), str(path))
        if isinstance(data, list):
            for n, item in enumerate(data):
                where = f"{path}:item {n}"
                yield where, _as_object(item, where)
        else:
            yield str(path), _as_object(data, str(path))
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pyarrow ships with tensorflow-datasets
            raise ImportError(f"{path}: reading parquet needs pyarrow ({e})") from e
        for n, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {n}", row
    else:
        raise ValueError(f"{path}: unsupported file type; expected .jsonl, .json or .parquet")


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _as_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def require_str(record: dict, field: str, where: str) -> str:
    """``record[field]`` as a non-empty string, or a ``ValueError`` naming both."""
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        found = ("missing" if field not in record
                 else f"got {type(value).__name__} {str(value)[:40]!r}")
        raise ValueError(
            f"{where}: expected field {field!r} to be a non-empty string ({found}; "
            f"keys: {sorted(record)})"
        )
    return value


def _check_dir(manual_dir, dataset: str) -> pathlib.Path:
    if manual_dir is None:
        raise FileNotFoundError(f"{dataset}: a manual_dir with the published files is required")
    path = pathlib.Path(manual_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: manual_dir {path} does not exist")
    return path


# -------------------------------------------------------------------------------- GSM8K


def gsm8k_files(manual_dir, split: str) -> list[pathlib.Path]:
    """The GSM8K files for ``split``: ``{split}.jsonl`` or ``{split}-*.parquet``."""
    root = _check_dir(manual_dir, "gsm8k")
    files = [root / f"{split}.jsonl"] if (root / f"{split}.jsonl").is_file() else \
        sorted(root.glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"gsm8k: expected {root / (split + '.jsonl')} (from github.com/openai/grade-school-math"
            f", grade_school_math/data/) or {root}/{split}-*.parquet; found neither"
        )
    return files


def gsm8k_records(manual_dir, split: str) -> Iterator[tuple[str, dict]]:
    """``(key, {"question", "answer", "answer_number"})`` for a GSM8K split;
    ``answer_number`` is the number after ``####`` (commas removed) as a string."""
    for file in gsm8k_files(manual_dir, split):
        for where, rec in read_records(file):
            question = require_str(rec, "question", where)
            answer = require_str(rec, "answer", where)
            try:
                number = extract_gsm8k_answer(answer)
            except ValueError as e:
                raise ValueError(f"{where}: field 'answer': {e}") from None
            yield where.rsplit("/", 1)[-1], {
                "question": question.strip(), "answer": answer.strip(), "answer_number": number}


# --------------------------------------------------------------------------------- MATH


def _math_problem_dir(root: pathlib.Path, split: str) -> pathlib.Path | None:
    for base in (root, root / "MATH"):
        d = base / split
        if d.is_dir() and any(d.glob("*/*.json")):
            return d
    return None


def math_files(manual_dir, split: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """``(base, files)`` for a MATH split: per-problem json files under
    ``[MATH/]{split}/<subject>/``, else ``{split}*.jsonl``/``{split}*.parquet`` below
    ``manual_dir``; keys are paths relative to ``base``."""
    root = _check_dir(manual_dir, "math")
    problem_dir = _math_problem_dir(root, split)
    if problem_dir is not None:
        return problem_dir, sorted(problem_dir.glob("*/*.json"))
    files = sorted(
        p for p in root.rglob(f"{split}*")
        if p.is_file() and p.suffix in (".jsonl", ".parquet")
        and (p.stem == split or p.stem.startswith(f"{split}-") or p.stem.startswith(f"{split}_"))
    )
    if not files:
        raise FileNotFoundError(
            f"math: expected per-problem files {root}/[MATH/]{split}/<subject>/<n>.json or "
            f"{split}.jsonl / {split}-*.parquet below {root}; found none"
        )
    return root, files


def parse_level(value, where: str) -> int:
    """MATH level as an int: ``"Level 3"`` or ``3`` -> 3; ``"Level ?"`` -> -1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().removeprefix("Level").strip()
        if text == "?":
            return -1
        if text.isdigit():
            return int(text)
    raise ValueError(f"{where}: expected field 'level' like 'Level 3' or 3, got {value!r}")


def math_records(manual_dir, split: str) -> Iterator[tuple[str, dict]]:
    """``(key, {"problem", "solution", "answer", "level", "type"})`` for a MATH split."""
    base, files = math_files(manual_dir, split)
    for file in files:
        for where, rec in read_records(file):
            problem = require_str(rec, "problem", where)
            solution = require_str(rec, "solution", where)
            if "type" in rec:
                subject = require_str(rec, "type", where)
            elif "subject" in rec:
                subject = require_str(rec, "subject", where)
            else:
                raise ValueError(
                    f"{where}: expected field 'type' (or 'subject'); keys: "
                    f"{sorted(rec)}")
            if "level" not in rec:
                raise ValueError(f"{where}: expected field 'level'; keys: {sorted(rec)}")
            level = parse_level(rec["level"], where)
            answer = rec.get("answer")
            if answer is None:
                answer = extract_boxed(solution)
                if answer is None:
                    raise ValueError(
                        f"{where}: field 'solution' has no balanced \\boxed{{...}} final answer")
            elif not isinstance(answer, str):
                raise ValueError(f"{where}: expected field 'answer' to be a string, got {answer!r}")
            key = where.replace(str(base) + "/", "", 1)
            yield key, {"problem": problem, "solution": solution, "answer": answer.strip(),
                        "level": level, "type": subject}
