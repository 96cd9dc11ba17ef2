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
        "lora:\n  r: 8\n  target_modules: all-linear\n  use_gradient_checkpointing: unsloth\n"
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
        ({"lora": {"use_gradient_checkpointing": "fast"}}, "lora.use_gradient_checkpointing"),
        ({"lora": {"gradient_checkpointing": "fast"}}, "lora.use_gradient_checkpointing"),  # the old name
        ({"lora": {"lora_alpha": 0}}, "lora.lora_alpha' must be > 0"),
        ({"lora": {"alpha": 0}}, "lora.lora_alpha' must be > 0"),
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


def test_lora_keys_are_get_peft_model_arguments():
    """The section goes to FastLanguageModel.get_peft_model whole: every key is one of its arguments."""
    import inspect

    from tuneforge.fast_language_model import FastLanguageModel

    arguments = inspect.signature(FastLanguageModel.get_peft_model).parameters
    lora = config_from_dict({"lora": {"lora_alpha": 32, "lora_dropout": 0.1}}).lora
    assert set(lora.to_api()) <= set(arguments)
    assert lora.to_api()["lora_alpha"] == 32 and lora.to_api()["lora_dropout"] == 0.1


OLD_KEYS = {"alpha": 32, "dropout": 0.1, "gradient_checkpointing": False}
NEW_KEYS = {"lora_alpha": 32, "lora_dropout": 0.1, "use_gradient_checkpointing": False}


def test_old_lora_keys_still_load_with_one_line_naming_the_new_ones(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 32\n  dropout: 0.1\n  gradient_checkpointing: false\n")
    with caplog.at_level("INFO", logger="tuneforge.config"):
        config = load_config(path)
    assert config == config_from_dict({"lora": {"r": 8, **NEW_KEYS}})
    renamed = [record.getMessage() for record in caplog.records if "renamed" in record.getMessage()]
    assert len(renamed) == 1
    for old, new in (("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                     ("gradient_checkpointing", "use_gradient_checkpointing")):
        assert f"lora.{old} -> lora.{new}" in renamed[0]
    assert config.to_dict()["lora"].keys() >= NEW_KEYS.keys()  # config.resolved.json: the new names only
    assert not config.to_dict()["lora"].keys() & OLD_KEYS.keys()


@pytest.mark.parametrize("old, new", [(old, new) for old, new in zip(OLD_KEYS, NEW_KEYS)])
def test_old_and_new_name_of_one_key_is_an_error_naming_both(old, new):
    with pytest.raises(ConfigError, match=rf"'lora.{old}' and 'lora.{new}' are the same setting.*keep 'lora.{new}'"):
        config_from_dict({"lora": {old: OLD_KEYS[old], new: NEW_KEYS[new]}})


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
