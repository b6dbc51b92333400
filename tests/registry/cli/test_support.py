"""Column widths of CLI tables (pure) and the recipe-file reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.cli.recipe_files import load_recipe_file, request_from_document
from registry.cli.support import Column, fit_widths
from registry.errors import InvalidInput

COLUMNS = [Column("brick", key=True), Column("base"), Column("tags"), Column("description", flex=True)]


def test_a_table_that_fits_keeps_its_natural_widths() -> None:
    assert fit_widths([10, 8, 6, 20], COLUMNS, 80) == [10, 8, 6, 20]


def test_the_flexible_column_shrinks_first_then_the_widest_other() -> None:
    widths = fit_widths([25, 20, 30, 90], COLUMNS, 80)
    assert widths[0] == 25  # the key column is never cut
    assert sum(widths) + 2 * 3 <= 80
    assert widths[3] == 12  # the description shrank to its floor first
    assert widths[2] < 30 and widths[1] == 20  # then the widest other column


def test_key_columns_overflow_rather_than_being_cut() -> None:
    widths = fit_widths([70, 20, 20, 40], COLUMNS, 80)
    assert widths[0] == 70 and widths[1:] == [6, 6, 12]


def test_recipe_documents_and_brickyard_json(tmp_path: Path) -> None:
    plain = request_from_document({"base_model": "b", "bricks": ["x", {"name": "y", "weight": 0.5}]})
    assert plain.request["bricks"] == [{"name": "x"}, {"name": "y", "weight": 0.5}] and plain.expected_id is None
    record = {
        "format": 1,
        "recipe": {
            "id": "a" * 64,
            "base_model": {"name": "b", "fingerprint": "f"},
            "bricks": [{"name": "x", "version": 2, "sha256": "s", "config_sha256": "c", "weight": 0.3}],
            "method": "ties",
            "params": {"density": 0.5},
            "output": "adapter",
            "rank": 4,
        },
        "composer": {},
    }
    (tmp_path / "brickyard.json").write_text(json.dumps(record))
    again = load_recipe_file(tmp_path)  # a directory means its brickyard.json
    assert again.expected_id == "a" * 64
    assert again.request == {
        "base_model": "b",
        "bricks": [{"name": "x", "version": 2, "weight": 0.3}],
        "method": "ties",
        "params": {"density": 0.5},
        "output": "adapter",
        "rank": 4,
    }
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InvalidInput, match="a mapping"):
        load_recipe_file(tmp_path / "list.yaml")
    with pytest.raises(InvalidInput, match="cannot read"):
        load_recipe_file(tmp_path / "missing.yaml")
