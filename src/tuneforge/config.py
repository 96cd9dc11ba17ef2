"""The YAML config of `tuneforge train`: one typed object, validated once, at the edge.

Every key is a dataclass field with a type; `load_config` rejects unknown keys (suggesting the
closest known one) and values of the wrong type, naming the key path, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

DEFAULT_MODEL = "tuneforge/smollm2-135m-instruct"
DEFAULT_DATASET = "tuneforge:default"  # the instruction set shipped in tuneforge/resources, less the held-out rows
DEFAULT_HELDOUT = "tuneforge:default-heldout"  # its last rows, never trained on: what `tuneforge eval` scores
REPORT_TARGETS = ("tensorboard", "wandb")

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
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    use_rslora: bool = False
    modules_to_save: Union[list[str], None] = None
    gradient_checkpointing: Union[bool, Literal["unsloth", "offload", "standard"]] = "unsloth"
    random_state: int = 3407


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
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
                f"config key '{path}' must be {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
            )
        kwargs[key] = value
    config = cls(**kwargs)
    _check_ranges(config, where)
    return config


def _check_ranges(config, where: str) -> None:
    positive = {
        "max_seq_length", "r", "alpha", "per_device_train_batch_size", "gradient_accumulation_steps",
    }
    for name in positive & {f.name for f in dataclasses.fields(config)}:
        if getattr(config, name) <= 0:
            raise ConfigError(f"config key '{where}.{name}' must be > 0, got {getattr(config, name)}")
    if isinstance(config, ModelConfig) and config.load_in_4bit and config.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit are both true: choose one")
    if isinstance(config, DataConfig) and not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {config.eval_fraction}")
    if isinstance(config, LoraConfig) and not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {config.dropout}")
    if isinstance(config, TrainingConfig):
        _check_training(config)
    if isinstance(config, TrainConfig):
        _check_evaluation(config)


def _check_training(t: TrainingConfig) -> None:
    for name in ("save_steps", "save_total_limit", "eval_steps", "early_stopping_patience"):
        if getattr(t, name) < 0:
            raise ConfigError(f"config key 'training.{name}' must be >= 0, got {getattr(t, name)}")
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


def config_from_dict(values: dict | None) -> TrainConfig:
    return _build(TrainConfig, values or {}, "")


def load_config(path: str | Path | None) -> TrainConfig:
    """Read and validate a YAML config; `None` gives the embedded default run."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
