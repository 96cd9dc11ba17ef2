"""The YAML config: every key typed; unknown keys and wrong types are errors that name them."""

import pytest

from tuneforge.config import ConfigError, TrainConfig, config_from_dict, load_config


def test_no_config_is_the_embedded_default():
    config = load_config(None)
    assert config == TrainConfig()
    assert config.model.name == "tuneforge/smollm2-135m-instruct" and config.model.load_in_4bit


def test_yaml_values_are_read_and_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  name: ./my-model\n  max_seq_length: 1024\n"
        "lora:\n  r: 8\n  target_modules: all-linear\n  gradient_checkpointing: unsloth\n"
        "training:\n  learning_rate: 2e-4\n  max_steps: 10\n"
    )
    config = load_config(path)
    assert config.model.max_seq_length == 1024 and config.model.name == "./my-model"
    assert config.lora.r == 8 and config.lora.target_modules == "all-linear"
    # PyYAML reads `2e-4` (no dot) as a string; float fields accept it as the number it is.
    assert config.training.learning_rate == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"modle": {}}, "unknown config key 'modle'; did you mean 'model'"),
        ({"lora": {"rank": 8}}, "unknown config key 'lora.rank'"),
        ({"lora": {"r": "eight"}}, "config key 'lora.r' must be int, got 'eight'"),
        ({"lora": {"r": True}}, "config key 'lora.r' must be int"),
        ({"model": {"load_in_4bit": "yes"}}, "config key 'model.load_in_4bit' must be bool"),
        ({"data": {"format": "csv"}}, "config key 'data.format' must be 'auto' | 'alpaca'"),
        ({"lora": {"gradient_checkpointing": "fast"}}, "lora.gradient_checkpointing"),
        ({"training": {"learning_rate": "fast"}}, "training.learning_rate' must be float"),
        ({"model": {"max_seq_length": 0}}, "model.max_seq_length' must be >= 2"),
        ({"model": {"load_in_4bit": True, "load_in_8bit": True}}, "both true"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction' must be in"),
        ({"training": 5}, "training: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_bad_yaml_and_missing_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'training.max_step'; did you mean 'max_steps'"):
        load_config(typo)
