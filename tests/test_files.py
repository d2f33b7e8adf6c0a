"""Atomic output files: an interrupted write leaves the old file (or none) and no temporary file."""
import pytest

from dfquant.io.files import atomic_write, atomic_write_all


def _interrupted(path):
    path.write_text("half")
    raise KeyboardInterrupt


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, _interrupted)
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, _interrupted)
    assert target.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_a_group_is_replaced_together_or_not_at_all(tmp_path):
    model, side = tmp_path / "m.safetensors", tmp_path / "m.json"
    model.write_text("old model")
    side.write_text("old sidecar")
    with pytest.raises(KeyboardInterrupt):
        atomic_write_all([(model, lambda p: p.write_text("new model")), (side, _interrupted)])
    assert model.read_text() == "old model" and side.read_text() == "old sidecar"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    atomic_write_all([(model, lambda p: p.write_text("new model")), (side, lambda p: p.write_text("new sidecar"))])
    assert model.read_text() == "new model" and side.read_text() == "new sidecar"
