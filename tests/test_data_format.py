"""The on-disk dataset format: round trips and every validation error naming its file."""

import json
import os

import numpy as np
import pytest

from hrm_jax.data.format import DatasetFormatError, PuzzleDatasetMetadata, load_metadata, load_split, write_split

SEQ_LEN, VOCAB, CODE_DIGITS = 6, 16, 3  # the first CODE_DIGITS input tokens encode the example id


def build_arrays(rng: np.random.Generator, num_groups: int, max_puzzles: int, max_examples: int,
                 num_ids: int = 7) -> dict[str, np.ndarray]:
    """Random set: groups of 1..max_puzzles puzzles of 1..max_examples examples each.

    Input rows start with the example id in base VOCAB (decode_examples inverts it); labels are
    random in [0, VOCAB) so about 1/VOCAB of them hit ignore_label_id 0.
    """
    puzzles_per_group = rng.integers(1, max_puzzles + 1, num_groups)
    num_puzzles = int(puzzles_per_group.sum())
    examples_per_puzzle = rng.integers(1, max_examples + 1, num_puzzles)
    n = int(examples_per_puzzle.sum())
    assert n < VOCAB ** CODE_DIGITS
    inputs = rng.integers(0, VOCAB, (n, SEQ_LEN))
    inputs[:, :CODE_DIGITS] = (np.arange(n)[:, None] // VOCAB ** np.arange(CODE_DIGITS)) % VOCAB
    return {"inputs": inputs.astype(np.uint8),
            "labels": rng.integers(0, VOCAB, (n, SEQ_LEN)).astype(np.uint8),
            "puzzle_identifiers": rng.integers(1, num_ids, num_puzzles).astype(np.int32),
            "puzzle_indices": np.concatenate([[0], np.cumsum(examples_per_puzzle)]).astype(np.int32),
            "group_indices": np.concatenate([[0], np.cumsum(puzzles_per_group)]).astype(np.int64)}


def decode_examples(inputs: np.ndarray) -> np.ndarray:
    """Example ids [B] from batch inputs [B, SEQ_LEN] built by build_arrays."""
    return (inputs[:, :CODE_DIGITS].astype(np.int64) * VOCAB ** np.arange(CODE_DIGITS)).sum(-1)


def metadata_for(sets: dict[str, dict[str, np.ndarray]], num_ids: int = 7, **overrides) -> PuzzleDatasetMetadata:
    examples = sum(len(a["inputs"]) for a in sets.values())
    puzzles = sum(len(a["puzzle_identifiers"]) for a in sets.values())
    fields = dict(seq_len=SEQ_LEN, vocab_size=VOCAB, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
                  num_puzzle_identifiers=num_ids, total_groups=sum(len(a["group_indices"]) - 1 for a in sets.values()),
                  mean_puzzle_examples=examples / puzzles, sets=list(sets))
    fields.update(overrides)
    return PuzzleDatasetMetadata(**fields)


def write_random(root, seed: int = 0, set_names=("all",), **kwargs) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sets = {name: build_arrays(rng, num_groups=kwargs.get("num_groups", 9), max_puzzles=3, max_examples=4)
            for name in set_names}
    write_split(root, "train", metadata_for(sets), sets, extra_arrays=kwargs.get("extra_arrays"))
    return sets


def test_round_trip_keeps_arrays_metadata_and_extras(tmp_path):
    difficulty = np.random.default_rng(5).random(20).astype(np.float32)
    sets = write_random(tmp_path, set_names=("a", "b"), extra_arrays={"a__difficulty": difficulty})
    split = load_split(tmp_path, "train")
    assert split.metadata == metadata_for(sets)
    assert list(split.sets) == ["a", "b"]
    for name, arrays in sets.items():
        for field, expected in arrays.items():
            got = getattr(split[name], field)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    assert isinstance(split["a"].inputs, np.memmap) and isinstance(split["a"].labels, np.memmap)
    np.testing.assert_array_equal(split["a"].extra["difficulty"], difficulty)
    assert split["b"].extra == {}
    assert split["a"].num_groups == 9 and split["a"].num_examples == len(sets["a"]["inputs"])


def test_reads_reference_style_metadata_without_extra(tmp_path):
    write_random(tmp_path)
    path = tmp_path / "train" / "dataset.json"
    data = json.loads(path.read_text())
    # Exactly the keys the reference's PuzzleDatasetMetadata dumps, plus an unknown one (ignored).
    reference_keys = {"pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                      "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "sets"}
    assert set(data) == reference_keys | {"extra"}
    path.write_text(json.dumps({**{k: data[k] for k in reference_keys}, "ignore_label_id": None, "x": 1}))
    meta = load_metadata(tmp_path, "train")
    assert meta.ignore_label_id is None and meta.extra == {} and meta.sets == ("all",)


def _save(root, name, array):
    np.save(os.path.join(root, "train", f"all__{name}.npy"), array)


def _arrays(root):
    return {k: np.load(os.path.join(root, "train", f"all__{k}.npy"))
            for k in ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")}


# Each case corrupts a valid split on disk: (id, mutate(root, arrays), file named, message fragment).
CORRUPTIONS = [
    ("missing_labels", lambda r, a: os.remove(os.path.join(r, "train", "all__labels.npy")),
     "all__labels.npy", "not found"),
    ("garbage_npy", lambda r, a: open(os.path.join(r, "train", "all__group_indices.npy"), "wb").write(b"junk"),
     "all__group_indices.npy", "not a readable"),
    ("float_inputs", lambda r, a: _save(r, "inputs", a["inputs"].astype(np.float32)), "all__inputs.npy", "dtype"),
    ("int16_indices", lambda r, a: _save(r, "puzzle_indices", a["puzzle_indices"].astype(np.int16)),
     "all__puzzle_indices.npy", "int32 or int64"),
    ("float_identifiers", lambda r, a: _save(r, "puzzle_identifiers", a["puzzle_identifiers"] * 1.0),
     "all__puzzle_identifiers.npy", "int32 or int64"),
    ("wrong_seq_len", lambda r, a: _save(r, "inputs", a["inputs"][:, :-1]), "all__inputs.npy", "seq_len=6"),
    ("labels_shape", lambda r, a: _save(r, "labels", a["labels"][:-1]), "all__labels.npy", "equal inputs"),
    ("indices_end", lambda r, a: _save(r, "puzzle_indices", a["puzzle_indices"][:-1]),
     "all__puzzle_indices.npy", "must end at"),
    ("indices_start", lambda r, a: _save(r, "puzzle_indices", np.concatenate([[1], a["puzzle_indices"][1:]])),
     "all__puzzle_indices.npy", "start at 0"),
    ("indices_not_monotone", lambda r, a: _save(r, "group_indices", a["group_indices"][[0, 2, 1, *range(3, 10)]]),
     "all__group_indices.npy", "strictly increase"),
    ("groups_end", lambda r, a: _save(r, "group_indices", a["group_indices"][:-1]),
     "all__group_indices.npy", "must end at"),
    ("identifiers_shape", lambda r, a: _save(r, "puzzle_identifiers", a["puzzle_identifiers"][1:]),
     "all__puzzle_identifiers.npy", "num_puzzles"),
    ("identifier_range", lambda r, a: _save(r, "puzzle_identifiers", a["puzzle_identifiers"] + 6),
     "all__puzzle_identifiers.npy", "num_puzzle_identifiers=7"),
    ("token_range", lambda r, a: _save(r, "inputs", np.where(a["inputs"] == 3, 16, a["inputs"])),
     "all__inputs.npy", "vocab_size=16"),
    ("label_range", lambda r, a: _save(r, "labels", np.where(a["labels"] == 3, 200, a["labels"])),
     "all__labels.npy", "ignore_label_id=0"),
]


@pytest.mark.parametrize("mutate,file,fragment", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_arrays_raise_naming_the_file(tmp_path, mutate, file, fragment):
    write_random(tmp_path)
    mutate(str(tmp_path), _arrays(tmp_path))
    with pytest.raises(DatasetFormatError) as err:
        load_split(tmp_path, "train")
    assert os.path.join(str(tmp_path), "train", file) in str(err.value) and fragment in str(err.value)


def test_labels_may_hold_an_out_of_vocab_ignore_id(tmp_path):
    sets = write_random(tmp_path)
    _save(str(tmp_path), "labels", np.where(sets["all"]["labels"] == 0, 255, sets["all"]["labels"]))
    path = tmp_path / "train" / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "ignore_label_id": 255}))
    assert load_split(tmp_path, "train").metadata.ignore_label_id == 255


def _edit_metadata(root, edit):
    path = os.path.join(root, "train", "dataset.json")
    data = json.load(open(path))
    edit(data)
    json.dump(data, open(path, "w"))


METADATA_CORRUPTIONS = [
    ("malformed", lambda r: open(os.path.join(r, "train", "dataset.json"), "w").write("{\"seq_len\": 6,"),
     "malformed JSON"),
    ("not_object", lambda r: open(os.path.join(r, "train", "dataset.json"), "w").write("[1, 2]"), "JSON object"),
    ("missing_keys", lambda r: _edit_metadata(r, lambda d: (d.pop("vocab_size"), d.pop("sets"))),
     "['vocab_size', 'sets']"),
    ("string_seq_len", lambda r: _edit_metadata(r, lambda d: d.update(seq_len="6")), "seq_len"),
    ("bad_set_name", lambda r: _edit_metadata(r, lambda d: d.update(sets=["../x"])), "set name"),
    ("pad_out_of_vocab", lambda r: _edit_metadata(r, lambda d: d.update(pad_id=16)), "pad_id"),
    ("total_groups", lambda r: _edit_metadata(r, lambda d: d.update(total_groups=8)), "total_groups=8"),
    ("mean_examples", lambda r: _edit_metadata(r, lambda d: d.update(mean_puzzle_examples=1.0)),
     "mean_puzzle_examples=1.0"),
    ("unknown_set", lambda r: _edit_metadata(r, lambda d: d.update(sets=["all", "b"])), "b__inputs.npy"),
]


@pytest.mark.parametrize("mutate,fragment", [c[1:] for c in METADATA_CORRUPTIONS],
                         ids=[c[0] for c in METADATA_CORRUPTIONS])
def test_bad_metadata_raises_naming_the_file(tmp_path, mutate, fragment):
    write_random(tmp_path)
    mutate(str(tmp_path))
    with pytest.raises(DatasetFormatError) as err:
        load_split(tmp_path, "train")
    message = str(err.value)
    assert fragment in message
    assert os.path.join(str(tmp_path), "train") in message


def test_missing_directory_and_metadata_suggest_building(tmp_path):
    with pytest.raises(DatasetFormatError, match="split directory not found; build the dataset"):
        load_split(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetFormatError, match=r"dataset\.json: metadata file not found; build"):
        load_split(tmp_path, "train")


def test_write_split_validates_before_writing(tmp_path):
    sets = {"all": build_arrays(np.random.default_rng(1), 5, 2, 2)}
    meta = metadata_for(sets)
    bad = {"all": {**sets["all"], "inputs": sets["all"]["inputs"][:, :4]}}
    with pytest.raises(DatasetFormatError, match="all__inputs.npy: shape"):
        write_split(tmp_path, "train", meta, bad)
    with pytest.raises(DatasetFormatError, match="extra_arrays"):
        write_split(tmp_path, "train", meta, {"all": {**sets["all"], "difficulty": np.zeros(3)}})
    with pytest.raises(DatasetFormatError, match="<set>__<name>"):
        write_split(tmp_path, "train", meta, sets, extra_arrays={"other__difficulty": np.zeros(3)})
    with pytest.raises(DatasetFormatError, match="differ from metadata.sets"):
        write_split(tmp_path, "train", meta, {"x": sets["all"]})
    assert not (tmp_path / "train").exists()


def test_metadata_validates_fields():
    good = dict(seq_len=6, vocab_size=16, pad_id=0, ignore_label_id=None, blank_identifier_id=0,
                num_puzzle_identifiers=1, total_groups=3, mean_puzzle_examples=1, sets=["all"])
    assert PuzzleDatasetMetadata(**good).to_json_dict()["sets"] == ["all"]
    for field, value in [("seq_len", 0), ("vocab_size", True), ("blank_identifier_id", 1),
                         ("sets", []), ("sets", ["a", "a"]), ("sets", ["a__b"]), ("mean_puzzle_examples", 0.5)]:
        with pytest.raises(DatasetFormatError, match=field if field != "sets" else "set"):
            PuzzleDatasetMetadata(**{**good, field: value})
    with pytest.raises(DatasetFormatError, match="JSON-serialisable"):
        PuzzleDatasetMetadata(**good, extra={"f": object()})


def test_check_values_false_skips_only_the_token_scan(tmp_path):
    sets = write_random(tmp_path)
    _save(str(tmp_path), "inputs", np.where(sets["all"]["inputs"] == 3, 16, sets["all"]["inputs"]))
    assert load_split(tmp_path, "train", check_values=False)["all"].inputs.max() == 16
    _save(str(tmp_path), "inputs", sets["all"]["inputs"][:, :-1])
    with pytest.raises(DatasetFormatError, match="all__inputs.npy: shape"):
        load_split(tmp_path, "train", check_values=False)
