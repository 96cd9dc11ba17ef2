"""Bad config values fail when the config is read, before any model loads, naming the key and what
to write instead. Each row of BAD_VALUES trained silently (or failed after loading, with a
traceback) before issue 15."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tuneforge.config import ConfigError, config_from_dict, load_config

BAD_VALUES = [
    ({"training": {"learning_rate": 0}}, "'training.learning_rate' must be > 0, got 0.0"),
    ({"training": {"learning_rate": -1e-4}}, "'training.learning_rate' must be > 0"),
    ({"training": {"learning_rate": float("nan")}}, "'training.learning_rate' must be a finite number"),
    ({"training": {"learning_rate": float("inf")}}, "'training.learning_rate' must be a finite number"),
    ({"training": {"embedding_learning_rate": 0}}, "'training.embedding_learning_rate' must be > 0"),
    ({"training": {"max_steps": -3}}, r"'training.max_steps' must be -1 \(train for training.num_train_epochs\)"),
    ({"training": {"max_steps": 0}}, "'training.max_steps' must be -1"),
    ({"training": {"num_train_epochs": 0}}, "'training.num_train_epochs' must be > 0"),
    ({"training": {"num_train_epochs": -2}}, "'training.num_train_epochs' must be > 0"),
    ({"training": {"warmup_steps": -1}}, "'training.warmup_steps' must be >= 0"),
    ({"training": {"logging_steps": 0}}, "'training.logging_steps' must be >= 1"),
    ({"training": {"weight_decay": -0.1}}, "'training.weight_decay' must be >= 0"),
    ({"training": {"max_grad_norm": -1}}, "'training.max_grad_norm' must be >= 0"),
    ({"training": {"seed": -1}}, r"'training.seed' must be in \[0, 2\^32\)"),
    ({"training": {"save_steps": -1}}, "'training.save_steps' must be >= 0"),
    ({"training": {"early_stopping_threshold": -1}}, "'training.early_stopping_threshold' must be >= 0"),
    ({"training": {"optim": "adamw_9bit"}}, "'training.optim' is 'adamw_9bit': not a known name; did you mean 'adamw_8bit'"),
    ({"training": {"optim": "galore_adamw"}}, "'training.optim' is 'galore_adamw': not a known name"),
    ({"training": {"lr_scheduler_type": "cosin"}}, "'training.lr_scheduler_type' is 'cosin'.*did you mean 'cosine'"),
    ({"training": {"lr_scheduler_type": "reduce_lr_on_plateau"}}, "'training.lr_scheduler_type'"),
    ({"training": {"output_dir": ""}}, "'training.output_dir' must be a folder"),
    ({"training": {"per_device_train_batch_size": 0}}, "'training.per_device_train_batch_size' must be > 0"),
    ({"model": {"max_seq_length": 1}}, "'model.max_seq_length' must be >= 2"),
    ({"model": {"name": ""}}, "'model.name' must be a model folder or name"),
    ({"lora": {"r": -4}}, "'lora.r' must be > 0"),
    ({"lora": {"target_modules": []}}, "'lora.target_modules' must be a non-empty list"),
    ({"lora": {"random_state": 2**40}}, r"'lora.random_state' must be in \[0, 2\^32\)"),
    ({"data": {"path": ""}}, "'data.path' must be a file"),
    ({"data": {"eval_fraction": -0.1}}, r"'data.eval_fraction' must be in \[0, 1\)"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_a_value_out_of_range_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_edge_values_that_are_allowed():
    config = config_from_dict({"training": {"max_steps": -1, "num_train_epochs": 0.5, "warmup_steps": 0,
                                            "max_grad_norm": 0, "optim": "adamw_torch",
                                            "lr_scheduler_type": "cosine"}})
    assert config.training.max_steps == -1 and config.training.num_train_epochs == 0.5


# 10 levels of 9 aliases, all inside one key of the right section: written out, training.seed would
# hold 9**9 lists of 9 strings. Before, the wrong-type message repr'd it until memory ran out.
BILLION_LAUGHS = "training:\n  seed:\n    - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


def test_billion_laughs_yaml_is_refused_without_expanding(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match="more than 10,000 values once its aliases"):
        load_config(path)


def test_billion_laughs_through_the_cli_is_a_short_error(tmp_path):
    """Before: the wrong-type message repr'd the expanded value (9**9 strings) until memory ran out."""
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "aliases" in result.stderr and len(result.stderr) < 2000


def test_a_wrong_value_is_shown_cut_to_a_line():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"training": {"seed": [[["x"] * 1000] * 1000]}})
    assert len(str(error.value)) < 300


def test_a_small_alias_is_fine_and_a_cycle_is_refused(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("lora:\n  target_modules: &m [q_proj, v_proj]\n  modules_to_save: null\n")
    assert load_config(ok).lora.target_modules == ["q_proj", "v_proj"]
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("lora: &x\n  target_modules: [*x]\n")
    with pytest.raises(ConfigError, match="refers to the mapping or list that holds it"):
        load_config(cycle)


def test_a_key_written_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys silently: the run would use a value the user may not see."""
    path = tmp_path / "twice.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  max_steps: 5\n  learning_rate: 1e-2\n")
    with pytest.raises(ConfigError, match="twice.yaml: line 4: key 'learning_rate' is written twice .*line 2"):
        load_config(path)


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"training:\n  output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin1.yaml: line 2: not UTF-8"):
        load_config(path)


def test_command_line_overrides_are_checked_too(tmp_path):
    """Before: `--max-steps -3` silently became a full epoch (here of a tiny model, so it ends soon)."""
    import json

    import yaml
    from tiny_chat_model import save_tiny_chat_model

    from tuneforge.cli import main
    from tuneforge.data.sources import default_rows

    model = save_tiny_chat_model(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in default_rows("train")[:4]))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(model), "load_in_4bit": False, "max_seq_length": 256, "use_kernels": False},
        "lora": {"use_gradient_checkpointing": False}, "data": {"path": str(data)},
        "training": {"optim": "adamw_torch", "report_to": "none"}}))
    assert main(["train", str(config), "--max-steps", "-3", "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
