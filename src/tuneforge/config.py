"""The YAML config of `tuneforge train`: one typed object, validated once, at the edge.

Every key is a dataclass field with a type; `load_config` rejects unknown keys (suggesting the
closest known one) and values of the wrong type, naming the key path, so a typo never silently
falls back to a default. The `lora` keys are named as `FastLanguageModel.get_peft_model`'s
arguments (`lora_alpha`, not `alpha`), so a section is passed on whole (`LoraSection.to_api()`);
the older names (RENAMED_KEYS) are still read, mapped to the new ones with one log line.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DEFAULT_MODEL = "tuneforge/smollm2-135m-instruct"
DEFAULT_DATASET = "tuneforge:default"  # the instruction set shipped in tuneforge/resources, less the held-out rows
DEFAULT_HELDOUT = "tuneforge:default-heldout"  # its last rows, never trained on: what `tuneforge eval` scores
REPORT_TARGETS = ("tensorboard", "wandb")

logger = logging.getLogger(__name__)

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and says what to write instead."""


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL
    max_seq_length: int = 512
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    full_finetuning: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    use_kernels: Union[bool, None] = None  # None: on with CUDA, off on the CPU (Triton has only its interpreter there)


@dataclass
class LoraSection:
    """The `lora:` section: each key is the `FastLanguageModel.get_peft_model` argument of that name."""

    r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    use_rslora: bool = False
    modules_to_save: Union[list[str], None] = None
    use_gradient_checkpointing: Union[bool, Literal["unsloth", "offload", "standard"]] = "unsloth"
    random_state: int = 3407

    def to_api(self) -> dict[str, Any]:
        """get_peft_model's keyword arguments: `get_peft_model(model, **config.lora.to_api())`."""
        return dataclasses.asdict(self)


# Keys renamed to match the API's argument names: old path -> new path. Configs written with the
# old names still load (`_renamed`, with one log line); giving both names is an error.
RENAMED_KEYS = {
    "lora.alpha": "lora.lora_alpha",
    "lora.dropout": "lora.lora_dropout",
    "lora.gradient_checkpointing": "lora.use_gradient_checkpointing",
}


@dataclass
class DataConfig:
    path: str = DEFAULT_DATASET
    split: str = "train"
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    chat_template: Union[str, None] = None  # None: the family's default from the model registry
    train_on_responses_only: bool = True
    packing: bool = False
    overflow: Literal["error", "truncate", "drop"] = "truncate"
    eval_fraction: float = 0.0
    field_map: Union[dict[str, str], None] = None


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/default"
    max_steps: int = 60
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    embedding_learning_rate: Union[float, None] = None
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    optim: str = "adamw_8bit"
    seed: int = 3407
    logging_steps: int = 1
    save_steps: int = 0  # 0: no intermediate checkpoints (the adapter is still saved at the end; --resume needs > 0)
    save_total_limit: int = 0  # keep the newest N checkpoints (and the best one); 0: keep all
    eval_steps: int = 0  # eval loss on data.eval_fraction every N steps; 0: once at the end
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0: off
    early_stopping_threshold: float = 0.0  # an eval loss must drop by more than this to count
    load_best_model_at_end: bool = False  # the saved adapter is the checkpoint with the lowest eval loss
    max_grad_norm: float = 1.0
    report_to: Union[list[str], Literal["auto", "none"]] = "auto"  # auto: TensorBoard / W&B when installed


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(value) -> bool:
    return value > 0


def _not_negative(value) -> bool:
    return value >= 0


def _seed(value) -> bool:
    return 0 <= value < 2**32  # numpy's seeds; torch would take more, the run seeds both


def _not_empty(value) -> bool:
    return len(value) > 0


# What each key may hold beyond its type: key -> (test, what to write). Checked once, when the
# config is read, so a wrong value fails before any model loads; docs/config.md lists them.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.name": (_not_empty, "a model folder or name"),
    "model.max_seq_length": (lambda v: v >= 2, ">= 2"),
    "lora.r": (_positive, "> 0"),
    "lora.lora_alpha": (_positive, "> 0"),
    "lora.lora_dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "lora.target_modules": (_not_empty, "a non-empty list of module names or 'all-linear'"),
    "lora.modules_to_save": (_not_empty, "a non-empty list, or null"),
    "lora.random_state": (_seed, "in [0, 2^32)"),
    "data.path": (_not_empty, "a file, a folder or a dataset name"),
    "data.split": (_not_empty, "a split name such as train"),
    "data.chat_template": (_not_empty, "a template name, or null"),
    "data.eval_fraction": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "training.output_dir": (_not_empty, "a folder"),
    "training.max_steps": (lambda v: v == -1 or v > 0,
                           "-1 (train for training.num_train_epochs) or a number of steps > 0"),
    "training.num_train_epochs": (_positive, "> 0"),
    "training.per_device_train_batch_size": (_positive, "> 0"),
    "training.gradient_accumulation_steps": (_positive, "> 0"),
    "training.learning_rate": (_positive, "> 0"),
    "training.embedding_learning_rate": (_positive, "> 0, or null (the learning_rate)"),
    "training.warmup_steps": (_not_negative, ">= 0"),
    "training.weight_decay": (_not_negative, ">= 0"),
    "training.seed": (_seed, "in [0, 2^32)"),
    "training.logging_steps": (lambda v: v >= 1, ">= 1"),
    "training.save_steps": (_not_negative, ">= 0 (0: no intermediate checkpoints)"),
    "training.save_total_limit": (_not_negative, ">= 0 (0: keep all)"),
    "training.eval_steps": (_not_negative, ">= 0 (0: once at the end)"),
    "training.early_stopping_patience": (_not_negative, ">= 0 (0: off)"),
    "training.early_stopping_threshold": (_not_negative, ">= 0"),
    "training.max_grad_norm": (_not_negative, ">= 0 (0: no clipping)"),
}

# transformers' optimizer names that need settings this config has no key for (GaLore / APOLLO
# target modules, LOMO's own training loop): refused here rather than after the model loaded.
_OPTIMIZERS_WITHOUT_KEYS = ("galore", "apollo", "lomo")
# Schedulers that need lr_scheduler_kwargs (min_lr, decay steps) or eval metrics every step.
_SCHEDULERS_WITHOUT_KEYS = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                            "reduce_lr_on_plateau", "greedy")


def known_optimizers() -> list[str]:
    """training.optim values: transformers' names (tuneforge's own table uses the same spelling)."""
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames if not any(part in o.value for part in _OPTIMIZERS_WITHOUT_KEYS)]


def known_schedulers() -> list[str]:
    """training.lr_scheduler_type values: transformers' schedulers that need no extra settings."""
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType if s.value not in _SCHEDULERS_WITHOUT_KEYS]


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 6, 6, 3


def _short(value) -> str:
    """repr(value) cut to a line: a value from YAML aliases may stand for billions of items."""
    return _REPR.repr(value)


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return annotation.__name__


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    if annotation is float:
        # YAML writes 2e-4 as a string in YAML 1.1 loaders; accept ints for floats, never bools.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _coerce(value, annotation):
    """PyYAML reads `2e-4` (no dot) as a string; accept such numbers for float fields."""
    if isinstance(value, str) and _accepts_float(annotation):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and annotation is float:
        return float(value)
    return value


def _accepts_float(annotation) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return float in typing.get_args(annotation)
    return False


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, path)
            continue
        value = _coerce(value, annotation)
        if not _matches(value, annotation):
            raise ConfigError(
                f"config key '{path}' must be {_type_name(annotation)}, got {_short(value)} ({type(value).__name__})"
            )
        kwargs[key] = value
    config = cls(**kwargs)
    _check_ranges(config, where)
    return config


def _check_ranges(config, where: str) -> None:
    for f in dataclasses.fields(config):
        path = f"{where}.{f.name}" if where else f.name
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{path}' must be a finite number, got {value}")
        if path in RANGES and value is not None:
            test, allowed = RANGES[path]
            if not test(value):
                raise ConfigError(f"config key '{path}' must be {allowed}, got {_short(value)}")
    if isinstance(config, ModelConfig) and config.load_in_4bit and config.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit are both true: choose one")
    if isinstance(config, TrainingConfig):
        _check_training(config)
    if isinstance(config, TrainConfig):
        _check_evaluation(config)


def _check_training(t: TrainingConfig) -> None:
    for key, value, known in (("optim", t.optim, known_optimizers()),
                              ("lr_scheduler_type", t.lr_scheduler_type, known_schedulers())):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"config key 'training.{key}' is {_short(value)}: not a known name; {hint}"
                              f"known: {', '.join(known)}")
    if isinstance(t.report_to, list):
        for target in t.report_to:
            if target not in REPORT_TARGETS:
                raise ConfigError(f"config key 'training.report_to' lists {target!r}; known: "
                                  f"{', '.join(REPORT_TARGETS)} (or write auto / none)")


def _check_evaluation(config: TrainConfig) -> None:
    """Keys that only work together: evaluation needs an eval split, the best checkpoint needs saves."""
    t, has_eval = config.training, config.data.eval_fraction > 0
    for name in ("eval_steps", "early_stopping_patience", "load_best_model_at_end"):
        if getattr(t, name) and not has_eval:
            raise ConfigError(f"config key 'training.{name}' needs an evaluation split: "
                              "set data.eval_fraction (e.g. 0.1)")
    for name in ("early_stopping_patience", "load_best_model_at_end"):
        if getattr(t, name) and not t.eval_steps:
            raise ConfigError(f"config key 'training.{name}' needs evaluations during training: "
                              "set training.eval_steps (e.g. 20)")
    if t.load_best_model_at_end and (not t.save_steps or t.save_steps % t.eval_steps):
        raise ConfigError(
            "config key 'training.load_best_model_at_end' needs a checkpoint at evaluation steps: "
            f"set training.save_steps to a multiple of training.eval_steps ({t.eval_steps}), got {t.save_steps}"
        )


def _renamed(values):
    """`values` with the old key names of RENAMED_KEYS replaced by the new ones (one info line)."""
    if not isinstance(values, dict):
        return values
    values, used = dict(values), []
    for old, new in RENAMED_KEYS.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        keys = values.get(section)
        if not isinstance(keys, dict) or old_key not in keys:
            continue
        if new_key in keys:
            raise ConfigError(f"config keys '{old}' and '{new}' are the same setting ('{old}' is its old name): "
                              f"keep '{new}'")
        values[section] = {new_key if key == old_key else key: value for key, value in keys.items()}
        used.append(f"{old} -> {new}")
    if used:
        logger.info("config keys renamed to get_peft_model's argument names: %s (the old names still work)",
                    ", ".join(used))
    return values


def config_from_dict(values: dict | None) -> TrainConfig:
    return _build(TrainConfig, _renamed(values or {}), "")


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """`config` with {"section.key": value} replaced, checked as if the YAML had said so
    (the command line's --output / --max-steps go through here)."""
    values = config.to_dict()
    for path, value in overrides.items():
        section, key = RENAMED_KEYS.get(path, path).split(".")
        values[section][key] = value
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{error} (from the command line)") from None


# A config is a few dozen values; YAML aliases (&a / *a) may make a tiny file stand for billions
# ("billion laughs"). PyYAML shares the aliased objects, so loading is cheap, but anything that
# walks or prints the values would expand them: the expanded size is counted and capped first.
MAX_CONFIG_VALUES = 10_000


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one
    silently, so `learning_rate` written twice would train with a value the user may not see)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: key {_short(key)} is written twice "
                                      f"in one mapping (first on line {seen[key] + 1}); keep one")
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _ConfigLoader.construct_mapping)


def _expanded_size(value, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `value` stands for once YAML aliases are written out (memoised by object)."""
    if not isinstance(value, (list, dict)):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError("a YAML alias refers to the mapping or list that holds it (a cycle)")
    open_.add(key)
    items = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
    total = 1
    for k, v in items:
        total += _expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_)
        if total > MAX_CONFIG_VALUES:
            break
    open_.discard(key)
    sizes[key] = total
    return total


def parse_yaml(text: str):
    """YAML text -> plain values: safe types only, no key twice, at most MAX_CONFIG_VALUES values."""
    values = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    if _expanded_size(values, {}, set()) > MAX_CONFIG_VALUES:
        raise ConfigError(f"the YAML stands for more than {MAX_CONFIG_VALUES:,} values once its aliases "
                          "(&name / *name) are expanded; a config needs a few dozen: write the values out")
    return values


def load_config(path: str | Path | None) -> TrainConfig:
    """Read and validate a YAML config; `None` gives the embedded default run."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text ({error.reason})") from None
    try:
        values = parse_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
