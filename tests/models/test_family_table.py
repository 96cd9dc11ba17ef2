"""The family table states each per-family fact once; every other module reads it from there.

Fast checks (no model runs): the table validates its rows, the shared facts (the seven projections,
the head_dim formula) have one source, and the GGUF exporter's per-architecture table holds no
family fact of its own but joins the family's row.
"""

import pytest
from transformers import LlamaConfig, Qwen3Config

from tuneforge.config import SEVEN_PROJECTIONS
from tuneforge.export import gguf_arch
from tuneforge.models.families import FamilySpec, all_families, get_family, head_dim
from tuneforge.planning.estimate import ModelFacts
from tuneforge.testing.tiny import tiny_config

FAMILIES = sorted(all_families())


def test_default_lora_targets_are_the_configs_seven_projections():
    assert get_family("llama").lora_targets == tuple(SEVEN_PROJECTIONS)
    assert FamilySpec("x", ("x",), "LlamaConfig", "chatml").lora_targets == tuple(SEVEN_PROJECTIONS)


@pytest.mark.parametrize("fields, message", [
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(qkv="packed"), "qkv='packed'"),
    (dict(experts=("gate_up_proj",)), "write mlp=None"),
    (dict(tiny_config_overrides=[("head_dim", 16)]), "tiny_config_overrides"),
])
def test_a_wrong_row_fails_naming_its_family(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        FamilySpec("oops", ("oops",), "LlamaConfig", "chatml", **fields)
    assert "family oops" in str(error.value)


def test_head_dim_is_the_configs_own_else_hidden_over_heads():
    assert head_dim(LlamaConfig(hidden_size=64, num_attention_heads=4)) == 16
    assert head_dim(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=32)) == 32
    # The planner and the GGUF exporter use this one function.
    assert gguf_arch.head_dim is head_dim
    assert ModelFacts.from_config(tiny_config("gemma", head_dim=32)).head_dim == 32


@pytest.mark.parametrize("family", [f for f in FAMILIES if get_family(f).gguf_arch])
def test_gguf_arch_names_a_row_of_the_exporter_and_joins_the_familys_norm(family):
    spec = get_family(family)
    arch = gguf_arch.arch_for(tiny_config(family))
    assert arch.name == spec.gguf_arch and spec.gguf_arch in gguf_arch.ARCHES
    assert arch.norm == spec.norm
    assert arch.norm_offset == (1.0 if spec.norm == "rms_offset" else 0.0)
    assert arch.layer_norm == (spec.norm == "layer")
    assert set(spec.model_types) <= gguf_arch.gguf_model_types()


def test_exporter_rows_leave_the_norm_to_the_family_table():
    assert {arch.norm for arch in gguf_arch.ARCHES.values()} == {"rms"}  # the dataclass default
    assert all(name == arch.name for name, arch in gguf_arch.ARCHES.items())


def test_rope_scaling_an_architecture_does_not_export_is_refused_naming_those_it_does():
    arch = gguf_arch.arch_for(tiny_config("qwen2"))
    with pytest.raises(gguf_arch.UnsupportedForGGUF, match="llama3 for llama, yarn for gpt-oss, longrope for phi3"):
        gguf_arch._rope_scaling(None, {"rope_type": "llama3"}, arch)
    assert gguf_arch.extra_tensors(arch, tiny_config("qwen2")) == {}
