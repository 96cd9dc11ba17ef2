"""Set-up for the model tests."""

import sys
from pathlib import Path

# test_families.py records its results through scripts/family_table.py (`import family_table`).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
