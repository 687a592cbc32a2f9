"""common.cli.write_table: the one CSV writer of the scripts (columns, empty cells, JSON for dicts, no temp left)."""
import csv
import json

from common.cli import write_table


def test_write_table_writes_the_columns_in_order_with_json_options_and_empty_missing_cells(tmp_path):
    path = write_table([{"n": 4, "options": {"k": 2}, "extra": "dropped"}, {"n": 8, "status": "ok"}],
                       tmp_path / "sub" / "t.csv", ["n", "options", "status"])
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["n", "options", "status"]
        rows = list(reader)
    assert rows == [{"n": "4", "options": json.dumps({"k": 2}), "status": ""}, {"n": "8", "options": "", "status": "ok"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.csv"]  # the temporary file was renamed away
