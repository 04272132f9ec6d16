import json

import pytest

from hf_semisparse.utils import write_json


def test_write_json_makes_folders_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    write_json(path, {"f1": 57.5, "rows": [1, 2]})
    assert json.loads(path.read_text()) == {"f1": 57.5, "rows": [1, 2]}
    write_json(path, {"f1": 58.0})  # replaces the old file whole
    assert json.loads(path.read_text()) == {"f1": 58.0}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_json_keeps_the_old_file_when_serialising_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
