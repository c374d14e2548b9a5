"""TrainSampler and eval_batches against the reference's semantics (puzzle_dataset.py), checked by
decoding which example each batch row came from."""

import json

import numpy as np
import pytest

from hrm_jax.data.format import load_split, write_split
from hrm_jax.data.sampler import IGNORE_LABEL_ID, SamplerError, TrainSampler, eval_batches
from tests.test_data_format import build_arrays, decode_examples, metadata_for


def _split(tmp_path, seed=0, num_groups=11, max_puzzles=3, max_examples=4, set_names=("all",)):
    rng = np.random.default_rng(seed)
    sets = {name: build_arrays(rng, num_groups, max_puzzles, max_examples) for name in set_names}
    write_split(tmp_path, "train", metadata_for(sets), sets)
    return load_split(tmp_path, "train"), sets


def _owners(arrays):
    """example -> puzzle and puzzle -> group lookup tables."""
    ex_puzzle = np.repeat(np.arange(len(arrays["puzzle_indices"]) - 1), np.diff(arrays["puzzle_indices"]))
    pz_group = np.repeat(np.arange(len(arrays["group_indices"]) - 1), np.diff(arrays["group_indices"]))
    return ex_puzzle, pz_group


def _expected_batch(arrays, examples):
    labels = arrays["labels"][examples].astype(np.int32)
    ex_puzzle, _ = _owners(arrays)
    return {"inputs": arrays["inputs"][examples].astype(np.int32),
            "labels": np.where(labels == 0, IGNORE_LABEL_ID, labels),  # ignore_label_id 0 -> -100
            "puzzle_identifiers": arrays["puzzle_identifiers"][ex_puzzle[examples]]}


def _check_iteration(sampler, arrays, order, batch_size, iteration, epochs_per_iter):
    """Walks one iteration's batches along the expected group order; returns groups consumed."""
    ex_puzzle, pz_group = _owners(arrays)
    sizes = np.diff(arrays["puzzle_indices"])
    pos = 0
    while sampler.epoch // epochs_per_iter == iteration:
        batch = sampler.next_batch()
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "inputs": ((batch_size, 6), np.int32), "labels": ((batch_size, 6), np.int32),
            "puzzle_identifiers": ((batch_size,), np.int32)}
        examples = decode_examples(batch["inputs"])
        for key, value in _expected_batch(arrays, examples).items():
            np.testing.assert_array_equal(batch[key], value, err_msg=key)
        row = 0
        while row < batch_size:
            # The next group gives distinct examples of one of its puzzles, all of them unless the
            # batch fills first (reference _sample_batch).
            puzzle = ex_puzzle[examples[row]]
            assert pz_group[puzzle] == order[pos]
            take = min(sizes[puzzle], batch_size - row)
            chunk = examples[row:row + take]
            assert np.all(ex_puzzle[chunk] == puzzle) and len(np.unique(chunk)) == take
            row, pos = row + take, pos + 1
    return pos


@pytest.mark.parametrize("batch_size,epochs_per_iter", [(5, 1), (7, 3), (16, 2)])
def test_batches_follow_reference_packing(tmp_path, batch_size, epochs_per_iter):
    split, sets = _split(tmp_path)
    arrays = sets["all"]
    sizes = np.diff(arrays["puzzle_indices"])
    smallest = np.minimum.reduceat(sizes, arrays["group_indices"][:-1])
    sampler = TrainSampler(split, batch_size, seed=3, epochs_per_iter=epochs_per_iter)
    for iteration in range(3):
        # Group order: epochs_per_iter permutations from Philox(seed + pass count), as the reference.
        rng = np.random.Generator(np.random.Philox(seed=3 + iteration + 1))
        order = np.concatenate([rng.permutation(11) for _ in range(epochs_per_iter)])
        used = _check_iteration(sampler, arrays, order, batch_size, iteration, epochs_per_iter)
        assert used > 0
        # The groups left over were a short batch, dropped: even their smallest puzzles fall short.
        assert smallest[order[used:]].sum() < batch_size


def test_single_example_puzzles_give_floor_batches_and_every_group_once(tmp_path):
    split, sets = _split(tmp_path, num_groups=23, max_puzzles=4, max_examples=1)
    _, pz_group = _owners(sets["all"])
    sampler = TrainSampler(split, 4, seed=0)
    epochs, groups = [], []
    for _ in range(5 * 5):  # floor(23 / 4) = 5 batches an epoch, the 3 leftover groups dropped
        epochs.append(sampler.epoch)
        groups.append(pz_group[decode_examples(sampler.next_batch()["inputs"])])
    assert epochs == [e for e in range(5) for _ in range(5)]
    assert sampler.epoch == 5
    for e in range(5):
        seen = np.concatenate(groups[5 * e:5 * e + 5])
        assert len(set(seen.tolist())) == 20  # each group at most once an epoch


def _reference_iteration(draws, sizes, batch_size):
    """Rows per puzzle of each full batch the reference packs from one iteration's puzzle draws."""
    batches, rows, size = [], np.zeros(len(sizes)), 0
    for p in draws:
        take = min(sizes[p], batch_size - size)
        rows[p] += take
        size += take
        if size == batch_size:
            batches.append(rows)
            rows, size = np.zeros(len(sizes)), 0
    return batches  # the short remainder is dropped


def test_puzzle_and_example_choice_are_uniform(tmp_path):
    # One group of 4 puzzles with 1, 2, 3, 5 examples; batch 3, so the 5-example puzzle is cut.
    sizes = [1, 2, 3, 5]
    arrays = {"inputs": np.zeros((11, 6), np.uint8), "labels": np.ones((11, 6), np.uint8),
              "puzzle_identifiers": np.arange(4, dtype=np.int32),
              "puzzle_indices": np.array([0, 1, 3, 6, 11], np.int32), "group_indices": np.array([0, 4], np.int32)}
    arrays["inputs"][:, 0] = np.arange(11)
    write_split(tmp_path, "train", metadata_for({"all": arrays}), {"all": arrays})
    sampler = TrainSampler(load_split(tmp_path, "train"), 3, seed=1, epochs_per_iter=3)
    n = 6000
    example_counts, puzzle_counts = np.zeros(11), np.zeros(4)
    for _ in range(n):
        batch = sampler.next_batch()
        example_counts += np.bincount(batch["inputs"][:, 0], minlength=11)
        puzzle_counts += np.bincount(batch["puzzle_identifiers"], minlength=4)
    # Long-run rows per puzzle = E[rows an iteration] / E[full batches an iteration], enumerating the
    # 4^3 equally likely uniform draws of one iteration (3 epochs of the single group).
    iterations = [_reference_iteration(d, sizes, 3) for d in np.ndindex(4, 4, 4)]
    expected = n * sum(sum(b) for b in iterations if b) / sum(len(b) for b in iterations)
    # Rows come in runs of up to 3, so allow 8 Poisson sigmas (about 4.5 true sigmas).
    assert np.all(np.abs(puzzle_counts - expected) < 8 * np.sqrt(expected)), (puzzle_counts, expected)
    # The 5 examples of the cut puzzle are equally likely to be taken.
    five = example_counts[6:]
    assert np.all(np.abs(five - five.mean()) < 8 * np.sqrt(five.mean())), five


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    split, _ = _split(tmp_path)
    a, b, c = (TrainSampler(split, 6, seed=s) for s in (4, 4, 5))
    for _ in range(12):
        batch_a, batch_b = a.next_batch(), b.next_batch()
        for key in batch_a:
            np.testing.assert_array_equal(batch_a[key], batch_b[key])
    assert any(not np.array_equal(a.next_batch()["inputs"], c.next_batch()["inputs"]) for _ in range(5))


@pytest.mark.parametrize("stop_after", [0, 3, 7, 13])
def test_restore_mid_epoch_continues_identically(tmp_path, stop_after):
    split, _ = _split(tmp_path, set_names=("a", "b"))
    original = TrainSampler(split, 5, seed=9, epochs_per_iter=2)
    for _ in range(stop_after):
        original.next_batch()
    state = json.loads(json.dumps(original.state()))  # must survive JSON
    assert state["epoch"] == original.epoch
    resumed = TrainSampler(split, 5, seed=9, epochs_per_iter=2)
    resumed.next_batch()  # move it elsewhere first so restore has to rewind
    resumed.restore(state)
    assert resumed.epoch == original.epoch
    for _ in range(30):
        x, y = original.next_batch(), resumed.next_batch()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert resumed.state() == original.state()


def test_restore_rejects_other_settings_and_garbage(tmp_path):
    split, _ = _split(tmp_path)
    state = TrainSampler(split, 5, seed=9).state()
    with pytest.raises(SamplerError, match="global_batch_size"):
        TrainSampler(split, 6, seed=9).restore(state)
    with pytest.raises(SamplerError, match="seed"):
        TrainSampler(split, 5, seed=8).restore(state)
    with pytest.raises(SamplerError, match="corrupt"):
        TrainSampler(split, 5, seed=9).restore({k: v for k, v in state.items() if k != "rng"})
    with pytest.raises(SamplerError, match="state"):
        TrainSampler(split, 5, seed=9).restore([1])


def test_sets_alternate_by_pass_and_set_name_restricts(tmp_path):
    split, sets = _split(tmp_path, set_names=("a", "b"), max_examples=1, max_puzzles=1)
    # 11 one-example groups, batch 5: 2 batches a pass, then the other set. Both sets number their
    # examples from 0, so tell them apart by the random tokens after the id.
    sampler = TrainSampler(split, 5, seed=0)

    def source(batch):
        rows = decode_examples(batch["inputs"])
        return [name for name in ("a", "b") if np.array_equal(sets[name]["inputs"][rows], batch["inputs"])]

    assert [source(sampler.next_batch()) for _ in range(6)] == [["a"], ["a"], ["b"], ["b"], ["a"], ["a"]]
    only_b = TrainSampler(split, 5, seed=0, set_name="b")
    assert [source(only_b.next_batch()) for _ in range(4)] == [["b"]] * 4


def test_bad_arguments(tmp_path):
    split, sets = _split(tmp_path, num_groups=3, max_puzzles=2, max_examples=2)
    largest = np.maximum.reduceat(np.diff(sets["all"]["puzzle_indices"]), sets["all"]["group_indices"][:-1]).sum()
    with pytest.raises(SamplerError, match="exceeds"):
        TrainSampler(split, int(largest) + 1, seed=0)
    TrainSampler(split, int(largest), seed=0).next_batch()  # possible, so allowed
    with pytest.raises(SamplerError, match="global_batch_size"):
        TrainSampler(split, 0, seed=0)
    with pytest.raises(ValueError, match="no set 'x'"):
        TrainSampler(split, 2, seed=0, set_name="x")


def test_eval_batches_cover_every_example_once_with_padding(tmp_path):
    split, sets = _split(tmp_path, set_names=("a", "b"))
    meta = split.metadata
    seen = {"a": [], "b": []}
    for set_name, batch, num_valid, valid in eval_batches(split, 8):
        assert all(v.shape[0] == 8 and v.dtype == np.int32 for v in batch.values())
        np.testing.assert_array_equal(valid, np.arange(8) < num_valid)
        rows = decode_examples(batch["inputs"][:num_valid])
        for key, value in _expected_batch(sets[set_name], rows).items():
            np.testing.assert_array_equal(batch[key][:num_valid], value, err_msg=key)
        assert np.all(batch["inputs"][num_valid:] == meta.pad_id)
        assert np.all(batch["labels"][num_valid:] == IGNORE_LABEL_ID)
        assert np.all(batch["puzzle_identifiers"][num_valid:] == meta.blank_identifier_id)
        seen[set_name].extend(rows.tolist())
    for name in ("a", "b"):
        assert seen[name] == list(range(len(sets[name]["inputs"])))  # in order, each once
    only_b = list(eval_batches(split, 8, set_name="b"))
    assert {b.set_name for b in only_b} == {"b"} and sum(b.num_valid for b in only_b) == len(sets["b"]["inputs"])
