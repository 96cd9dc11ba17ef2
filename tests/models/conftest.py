"""Fixtures shared by the model tests."""

import sys
from pathlib import Path

import pytest

from tuneforge.testing.tiny import TEST_DEVICE, tiny_model

# test_families.py records its results through scripts/family_table.py (`import family_table`).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a saved tiny random model folder of that family (made on first use, once per module)."""
    made = {}

    def folder(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            tiny_model(family, device=TEST_DEVICE).save_pretrained(made[family])
        return made[family]

    return folder
