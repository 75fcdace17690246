"""TFDS dataset builders for the reasoning tasks, written as ``array_record`` files.

Four ``tfds.core.GeneratorBasedBuilder`` subclasses, stored under
``{data_dir}/r1jax_<name>/<config>/<version>/``:

* :class:`Countdown` and :class:`Arithmetic` -- procedural (:mod:`r1jax.data.tasks`);
  sizes, seed and task options live in the builder config, so tests can build 50
  examples.  Train is examples ``[0, num_train)``; test draws indices from
  ``tasks.TEST_INDEX_OFFSET`` upward, skipping questions that occur in train.
* :class:`Gsm8k` and :class:`Math` -- read the published files from ``manual_dir``
  (:mod:`r1jax.data.readers`); a split is built when its files are present.

No TensorFlow is needed: with ``file_format="array_record"`` TFDS serialises examples
with its numpy/protobuf path and ``as_data_source`` reads them back through
``array_record``.  Two things must be avoided without TF: ``dataset_info_from_configs``
(it looks for metadata files next to the builder's module) -- ``_info`` builds
``tfds.core.DatasetInfo`` directly -- and name-based lookup (``tfds.builder``,
``tfds.load``, ``tfds.list_builders`` touch the community index and TF); instantiate
the classes directly, or use :func:`r1jax.data.sources.load_source`.  The classes skip
TFDS registration so they never clash with TFDS's own catalogue.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from r1jax.data import readers, tasks

VERSION = tfds.core.Version("1.0.0")

# TFDS derives ``code_path`` through ``importlib_resources`` (not installed, not needed)
# for builders defined inside a package; giving it explicitly avoids that import.
_CODE_PATH = epath.Path(__file__)


@dataclasses.dataclass(eq=False)
class CountdownConfig(tfds.core.BuilderConfig):
    """Sizes, seed and generator options of a Countdown dataset."""

    num_train: int = 50_000
    num_test: int = 1_000
    seed: int = 0
    min_count: int = 3
    max_count: int = 4
    min_value: int = 1
    max_value: int = 99
    min_target: int = 1
    max_target: int = 100

    def task_kwargs(self) -> dict:
        """Keyword arguments for :func:`r1jax.data.tasks.countdown_example`."""
        return {k: getattr(self, k) for k in
                ("min_count", "max_count", "min_value", "max_value", "min_target", "max_target")}


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds.core.BuilderConfig):
    """Difficulty, kind, sizes and seed of an arithmetic dataset."""

    difficulty: int = 1
    kind: str = "expression"
    num_train: int = 20_000
    num_test: int = 1_000
    seed: int = 0

    def task_kwargs(self) -> dict:
        """Keyword arguments for :func:`r1jax.data.tasks.arithmetic_example`."""
        return {"difficulty": self.difficulty, "kind": self.kind}


def _name_countdown(cfg: CountdownConfig) -> CountdownConfig:
    cfg.name = (f"n{cfg.num_train}-{cfg.num_test}_s{cfg.seed}_c{cfg.min_count}-{cfg.max_count}"
                f"_v{cfg.min_value}-{cfg.max_value}_t{cfg.min_target}-{cfg.max_target}")
    cfg.version = VERSION
    return cfg


def _name_arithmetic(cfg: ArithmeticConfig) -> ArithmeticConfig:
    if cfg.kind not in tasks.ARITHMETIC_KINDS:
        raise ValueError(f"arithmetic config: kind must be one of {tasks.ARITHMETIC_KINDS}, "
                         f"got {cfg.kind!r}")
    tasks.arithmetic_limits(cfg.difficulty)
    cfg.name = f"d{cfg.difficulty}_{cfg.kind}_n{cfg.num_train}-{cfg.num_test}_s{cfg.seed}"
    cfg.version = VERSION
    return cfg


def countdown_config(**options) -> CountdownConfig:
    """A :class:`CountdownConfig` whose name encodes every option (so distinct options
    never share a directory); unknown options raise ``TypeError``."""
    return _predefined(Countdown, _name_countdown(CountdownConfig(name="", **options)))


def arithmetic_config(**options) -> ArithmeticConfig:
    """An :class:`ArithmeticConfig` whose name encodes every option."""
    return _predefined(Arithmetic, _name_arithmetic(ArithmeticConfig(name="", **options)))


def _predefined(builder_cls, cfg):
    """TFDS refuses a custom config named like a predefined one: return that one."""
    for known in builder_cls.__dict__.get("BUILDER_CONFIGS", []):
        if known.name == cfg.name:
            return known
    return cfg


def _procedural_splits(make, cfg) -> dict:
    """Train: indices ``[0, num_train)``.  Test: indices from TEST_INDEX_OFFSET up,
    skipping questions seen in train; raises if the task space is too small."""
    train = [make(cfg.seed, i) for i in range(cfg.num_train)]
    return {"train": enumerate(train), "test": _test_examples(make, cfg, train)}


def _test_examples(make, cfg, train: list):
    seen = {ex["question"] for ex in train}
    budget = 20 * cfg.num_test + 1_000
    found, index = 0, tasks.TEST_INDEX_OFFSET
    while found < cfg.num_test:
        if index - tasks.TEST_INDEX_OFFSET >= budget:
            raise RuntimeError(
                f"{cfg.name}: found only {found} of {cfg.num_test} test questions absent from "
                f"train after {budget} draws; the task space is too small for num_train="
                f"{cfg.num_train} -- lower num_train/num_test or raise the difficulty")
        ex = make(cfg.seed, index)
        if ex["question"] not in seen:
            seen.add(ex["question"])
            yield index, ex
            found += 1
        index += 1


class Countdown(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Countdown (TinyZero): numbers, a reachable target, one solution, the question."""

    name = "r1jax_countdown"
    code_path = _CODE_PATH
    VERSION = VERSION
    BUILDER_CONFIGS = [_name_countdown(CountdownConfig(name=""))]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural Countdown tasks (r1jax.data.tasks.countdown_example).",
            features=tfds.features.FeaturesDict({
                "numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "target": np.int32,
                "solution": tfds.features.Text(),
                "question": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        kwargs = cfg.task_kwargs()

        def make(seed, index):
            return tasks.countdown_example(seed, index, **kwargs)

        return {split: self._generate_examples(examples)
                for split, examples in _procedural_splits(make, cfg).items()}

    def _generate_examples(self, examples):
        yield from examples


class Arithmetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Arithmetic expressions or word problems at one difficulty."""

    name = "r1jax_arithmetic"
    code_path = _CODE_PATH
    VERSION = VERSION
    BUILDER_CONFIGS = [_name_arithmetic(ArithmeticConfig(name="", difficulty=d, kind=k))
                       for k in tasks.ARITHMETIC_KINDS for d in range(1, 6)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural arithmetic (r1jax.data.tasks.arithmetic_example).",
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "difficulty": np.int32,
                "solution": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        kwargs = cfg.task_kwargs()

        def make(seed, index):
            return tasks.arithmetic_example(seed, index, **kwargs)

        return {split: self._generate_examples(examples)
                for split, examples in _procedural_splits(make, cfg).items()}

    def _generate_examples(self, examples):
        yield from examples


def _present_splits(find, manual_dir, dataset: str) -> list[str]:
    """Splits whose files exist; raises listing what was expected when none do."""
    present, errors = [], []
    for split in ("train", "test"):
        try:
            find(manual_dir, split)
            present.append(split)
        except FileNotFoundError as e:
            errors.append(str(e))
    if not present:
        raise FileNotFoundError(
            f"{dataset}: no split files found in {manual_dir}:\n" + "\n".join(errors))
    return present


class Gsm8k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GSM8K from the published JSONL (or HF parquet) files in ``manual_dir``."""

    name = "r1jax_gsm8k"
    code_path = _CODE_PATH
    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place train.jsonl and test.jsonl from github.com/openai/grade-school-math "
        "(grade_school_math/data/) in manual_dir.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="GSM8K grade-school math word problems (Cobbe et al., 2021).",
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "answer_number": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {split: self._generate_examples(root, split)
                for split in _present_splits(readers.gsm8k_files, root, "gsm8k")}

    def _generate_examples(self, root, split):
        yield from readers.gsm8k_records(root, split)


class Math(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Hendrycks MATH from the released per-problem JSON tree (or JSONL/parquet)."""

    name = "r1jax_math"
    code_path = _CODE_PATH
    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the MATH release (train/<subject>/<n>.json, test/<subject>/<n>.json) into "
        "manual_dir, or place train*.jsonl/test*.jsonl or *.parquet files with fields "
        "problem, level, type, solution there.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MATH competition problems (Hendrycks et al., 2021).",
            features=tfds.features.FeaturesDict({
                "problem": tfds.features.Text(),
                "solution": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "level": np.int32,
                "type": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        return {split: self._generate_examples(root, split)
                for split in _present_splits(readers.math_files, root, "math")}

    def _generate_examples(self, root, split):
        yield from readers.math_records(root, split)


BUILDERS = {"countdown": Countdown, "arithmetic": Arithmetic, "gsm8k": Gsm8k, "math": Math}
"""Short names accepted by :func:`r1jax.data.sources.load_source`."""
CONFIG_FACTORIES = {"countdown": countdown_config, "arithmetic": arithmetic_config}
