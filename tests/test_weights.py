"""The published-weights pointer: atomic replacement, increasing versions, clear errors, pruning."""

import json
import os

import pytest

from sage import weights


def test_pointer_round_trip_and_increasing_versions(tmp_path):
    assert weights.read_current(tmp_path) is None
    weights.write_current(tmp_path, {"version": 1, "path": weights.version_dir(tmp_path, 1), "note": "x"})
    assert weights.read_current(tmp_path) == {"version": 1, "path": str(tmp_path / "v000001"), "note": "x"}
    with pytest.raises(weights.WeightsError, match="not above the published 1"):
        weights.write_current(tmp_path, {"version": 1, "path": "p"})
    weights.write_current(tmp_path, {"version": 2, "path": "p"})
    assert weights.read_current(tmp_path)["version"] == 2
    assert sorted(os.listdir(tmp_path)) == [weights.POINTER]  # no temporary file left behind


def test_malformed_pointer_is_named(tmp_path):
    (tmp_path / weights.POINTER).write_text("{torn")
    with pytest.raises(weights.WeightsError, match="unreadable weights pointer"):
        weights.read_current(tmp_path)
    (tmp_path / weights.POINTER).write_text(json.dumps({"version": "1"}))
    with pytest.raises(weights.WeightsError, match="integer 'version'"):
        weights.read_current(tmp_path)


def test_prune_keeps_the_newest_and_the_published(tmp_path):
    for v in range(1, 6):
        os.makedirs(weights.version_dir(tmp_path, v))
    weights.write_current(tmp_path, {"version": 2, "path": weights.version_dir(tmp_path, 2)})
    assert weights.prune(tmp_path, keep=2) == [1, 3]
    assert sorted(os.listdir(tmp_path)) == [weights.POINTER, "v000002", "v000004", "v000005"]
