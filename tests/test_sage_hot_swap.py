"""Hot swap of served weights (sage/hot_swap.py) under load, and the idle-triggered sleep cycle.

A tiny random HRM is published as version 0 of a weights directory; a server in a thread serves it
on the torch backend (from the orbax checkpoint, as `--weights-dir` does) while a client thread
submits requests without pause; version 1 (lm_head negated: other predictions) is published
mid-stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from hrm_jax.model import init_params
from sage import weights
from sage.__main__ import main as sage_main
from sage.backends import load_backend
from sage.client import Client
from sage.hot_swap import IdleSleeper, WeightsReloader
from sage.mailbox import Mailbox, MailboxNotFoundError
from sage.protocol import Status
from sage.serve import Server, open_or_create
from sage.sleep import publish
from tests.sage_helpers import running
from tests.test_sage_serve import CONFIG, name, puzzles

ROOT = Path(__file__).resolve().parents[1]


def negated_head(params):
    dense = dict(params["dense"], lm_head={"kernel": -params["dense"]["lm_head"]["kernel"]})
    return dict(params, dense=dense)


@pytest.fixture(scope="module")
def params():
    """(params of version 0, params of version 1)."""
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    return params, negated_head(params)


def solver(checkpoint, cache):
    return load_backend(checkpoint, "torch", cache_dir=cache).model


@contextlib.contextmanager
def weights_server(weights_dir, state_dir, sleeper=None, backend="torch", **kwargs):
    inbox, outbox = name("in"), name("out")
    boxes = [open_or_create(inbox, 4096, 256), open_or_create(outbox, 4096, 256)]
    current = weights.read_current(weights_dir)
    load = lambda path: load_backend(path, backend, cache_dir=Path(state_dir) / "models", threads=1)  # noqa: E731
    reloader = WeightsReloader(weights_dir, load, current["version"], interval=0.05)
    server = Server(load(current["path"]), *boxes, Path(state_dir), reloader=reloader, sleeper=sleeper, **kwargs)
    with running(server, boxes, join_timeout=60):
        yield server, inbox


def swap_under_load(backend, params, tmp_path, minimum, fmt="checkpoint"):
    """Publishes version 0, serves it on `backend` under a continuous stream of requests, publishes version 1
    after `minimum` answers and keeps sending until `minimum` requests were acknowledged after the swap.
    Returns (submitted [(id, row, acknowledged at)], answers {id: (response, received at)}, inputs,
    published_at, swapped_at)."""
    old_params, new_params = params
    weights_dir = tmp_path / "served"
    publish(str(weights_dir), old_params, CONFIG, {"source": "test"}, version=0, fmt=fmt)
    submitted: list[tuple[int, int, float]] = []  # (request id, input row, time its push was acknowledged)
    answers: dict[int, tuple[object, float]] = {}  # request id -> (response, time the client had it)
    inputs = puzzles(400, seed=5)
    stop = threading.Event()
    with weights_server(weights_dir, tmp_path / "state", backend=backend, max_batch=8, max_wait=0.005) as (
            server, inbox), Client(inbox) as client:
        def send():
            for k in itertools.count():  # until told to stop: the swap's timing depends on the machine's load
                if stop.is_set():
                    return
                submitted.append((client.submit(inputs[k % len(inputs)]), k % len(inputs), time.monotonic()))
                time.sleep(0.005)

        def collect():
            done = 0
            while not (stop.is_set() and done == len(submitted)):
                if done < len(submitted):
                    answers[submitted[done][0]] = client.wait(submitted[done][0], 60), time.monotonic()
                    done += 1
                else:
                    time.sleep(0.005)

        sender, collector = threading.Thread(target=send), threading.Thread(target=collect)
        sender.start()
        collector.start()
        try:
            while len(answers) < minimum:
                time.sleep(0.01)
            published_at = time.monotonic()
            publish(str(weights_dir), new_params, CONFIG, {"source": "test"}, fmt=fmt)
            while server.reloader.version != 1 and time.monotonic() < published_at + 60:
                time.sleep(0.01)
            assert server.reloader.version == 1
            swapped_at = time.monotonic()
            while sum(t > swapped_at for _, _, t in submitted) < minimum:
                time.sleep(0.01)
        finally:
            stop.set()
        sender.join()
        collector.join(120)
        time.sleep(0.2)  # a duplicate answer would have arrived by now
    assert sorted(answers) == sorted(i for i, _, _ in submitted)
    assert all(a.status is Status.OK for a, _ in answers.values())
    assert client.duplicates == 0
    stats = json.loads((tmp_path / "state" / "stats.json").read_text())
    assert stats["weights_version"] == 1 and stats["counts"]["weight_swaps"] == 1 and stats["backend"] == backend
    assert stats["counts"]["received"] == stats["counts"]["answers_ok"] == len(submitted)
    return submitted, answers, inputs, published_at, swapped_at


def assert_answers_are_each_versions(submitted, answers, inputs, published_at, swapped_at, weights_dir, cache,
                                     minimum):
    """Requests answered before version 1 was published carry version 0's answers (the torch solver of that
    version, exactly: predictions and steps), requests acknowledged after the swap version 1's; the two differ."""
    after = [(i, row) for i, row, t in submitted if t > swapped_at]
    before = [(i, row) for i, row, _ in submitted if answers[i][1] < published_at]
    assert len(after) >= minimum and len(before) >= minimum
    new = solver(weights.version_dir(weights_dir, 1), cache)
    old = solver(weights.version_dir(weights_dir, 0), cache)
    for model, group in ((new, after), (old, before)):
        rows = [row for _, row in group]
        want = model.solve(torch.from_numpy(inputs[rows]), torch.zeros(len(rows), dtype=torch.int32), early_halt=True)
        np.testing.assert_array_equal(np.stack([answers[i][0].prediction for i, _ in group]),
                                      want.logits.argmax(-1).numpy())
        np.testing.assert_array_equal([answers[i][0].steps for i, _ in group], want.steps.numpy())
    rows = [row for _, row in after]
    assert not np.array_equal(np.stack([answers[i][0].prediction for i, _ in after]),
                              old.solve(torch.from_numpy(inputs[rows]), torch.zeros(len(rows), dtype=torch.int32),
                                        early_halt=True).logits.argmax(-1).numpy())


def test_swap_mid_stream_drops_nothing_and_serves_the_new_weights(params, tmp_path):
    """Requests answered before version 1 was published carry version 0's answers, requests sent after
    the swap version 1's; the ones in flight across it are answered OK, once."""
    run = swap_under_load("torch", params, tmp_path, minimum=30)
    assert_answers_are_each_versions(*run, tmp_path / "served", tmp_path / "m", minimum=30)


@pytest.mark.slow  # two ONNX exports: 10-45 s each on a loaded 2-core CPU
@pytest.mark.parametrize("fmt", ["folder", "checkpoint"])
def test_onnx_backend_reexports_each_version_off_the_serving_thread(params, tmp_path, fmt):
    """--backend onnx: version 1 (a model folder, as the torch sleep trainer publishes it, or the jax trainer's
    checkpoint) is exported to ONNX on the reloader's thread while version 0 keeps answering, then swapped
    in; nothing dropped or doubled, and the answers are each version's."""
    run = swap_under_load("onnx", params, tmp_path, minimum=10, fmt=fmt)
    submitted, answers, _, published_at, swapped_at = run
    assert_answers_are_each_versions(*run, tmp_path / "served", tmp_path / "m", minimum=10)
    exports = sorted((tmp_path / "state" / "models").glob("*.segment.onnx"))
    assert len(exports) == 2  # one graph per version
    served_while_exporting = [i for i, (_, t) in answers.items() if published_at < t < swapped_at]
    assert len(served_while_exporting) >= 5, (len(served_while_exporting), swapped_at - published_at)


NO_TORCH_SERVE = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None
    from sage.__main__ import main
    sys.exit(main(["serve", "--model", "unused", "--backend", "onnx", *sys.argv[1:]]))
""")


def test_onnx_backend_without_torch_says_that_exporting_needs_it(params, tmp_path):
    weights_dir = tmp_path / "served"
    publish(str(weights_dir), params[0], CONFIG, {"source": "test"}, version=0, fmt="folder")
    out = subprocess.run([sys.executable, "-c", NO_TORCH_SERVE, "--weights-dir", str(weights_dir), "--inbox",
                          name("in"), "--outbox", name("out"), "--state-dir", str(tmp_path / "state")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "exporting needs torch" in lines[0] and "v000000" in lines[0], lines


def test_a_version_of_another_model_is_refused_and_the_old_one_kept(params, tmp_path):
    other = tmp_path / "other"
    publish(str(other), params[0], CONFIG, {"source": "test"}, version=0)
    wider = dataclasses.replace(CONFIG, hidden_size=64)
    with weights_server(other, tmp_path / "state") as (server, inbox), Client(inbox) as client:
        publish(str(other), init_params(wider, jax.random.PRNGKey(1)), wider, {"source": "test"})
        deadline = time.monotonic() + 30
        while server.reloader._refused != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.reloader._refused == 1 and server.reloader.version == 0
        assert client.solve(puzzles(1, seed=3)[0]).status is Status.OK


IDLE_PUBLISHER = textwrap.dedent("""
    import shutil, sys
    from sage import weights
    weights_dir, source = sys.argv[1:]
    current = weights.read_current(weights_dir)
    path = weights.version_dir(weights_dir, current["version"] + 1)
    shutil.copytree(source, path)
    weights.write_current(weights_dir, {"version": current["version"] + 1, "path": path})
""")


def test_idle_server_starts_one_sleep_cycle_and_swaps_to_what_it_publishes(params, tmp_path):
    """The sleep child is a stand-in that publishes a prepared checkpoint (a real cycle is tests/test_sleep.py)."""
    served = tmp_path / "served"
    publish(str(served), params[0], CONFIG, {"source": "test"}, version=0)
    publish(str(tmp_path / "prepared"), params[1], CONFIG, {"source": "test"}, version=0)
    command = [sys.executable, "-c", IDLE_PUBLISHER, str(served), weights.version_dir(tmp_path / "prepared", 0)]
    row = puzzles(1, seed=7)[0]
    with weights_server(served, tmp_path / "state", sleeper=IdleSleeper(command, idle_after=0.5)) as (server, inbox), \
            Client(inbox) as client:
        time.sleep(1.0)
        assert server.sleeper.child is None  # idle, but nothing served yet: nothing to learn from
        first = client.solve(row)
        deadline = time.monotonic() + 60
        while server.reloader.version != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.reloader.version == 1
        time.sleep(1.0)  # idle again, but no request since the cycle started: no second cycle
        counts = dict(server.telemetry.counts)
        second = client.solve(row)
    assert counts.get("sleep_cycles_started") == 1 and counts.get("sleep_cycles_finished") == 1
    assert counts.get("weight_swaps") == 1
    for version, answer in ((0, first), (1, second)):
        model = solver(weights.version_dir(served, version), tmp_path / "m")
        want = model.solve(torch.from_numpy(row[None]), torch.zeros(1, dtype=torch.int32), early_halt=True)
        np.testing.assert_array_equal(answer.prediction, want.logits.argmax(-1).numpy()[0])
    assert not np.array_equal(first.prediction, second.prediction)


@pytest.mark.parametrize("flags, problem", [
    (["--sleep-when-idle", "5"], "needs --weights-dir"),
    (["--weights-dir", "W", "--experiences", "E", "--sleep-when-idle", "5"], "--heldout"),
    (["--weights-dir", "W", "--reload-interval", "0"], "--reload-interval must be > 0"),
])
def test_bad_weights_flags_get_one_line(flags, problem, tmp_path, capsys):
    argv = ["serve", "--model", "m.onnx", "--inbox", name("in"), "--outbox", name("out"),
            "--state-dir", str(tmp_path), *flags]
    assert sage_main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1


def test_cli_serve_jax_backend_swaps_to_a_new_version(params, tmp_path):
    """`python -m sage serve --backend jax --weights-dir`: serves the published version (not --model),
    swaps to the next one; answers equal the torch solver of each version."""
    weights_dir, state = tmp_path / "served", tmp_path / "state"
    publish(str(weights_dir), params[0], CONFIG, {"source": "test"}, version=0)
    inbox, outbox = name("in"), name("out")
    server = subprocess.Popen([sys.executable, "-m", "sage", "serve", "--model", str(ROOT), "--backend", "jax",
                               "--weights-dir", str(weights_dir), "--reload-interval", "0.1", "--inbox", inbox,
                               "--outbox", outbox, "--state-dir", str(state)], cwd=ROOT)
    row = puzzles(1, seed=11)[0]
    try:
        deadline = time.monotonic() + 120
        while not (state / "stats.json").exists():  # written once the server serves
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        with Client(inbox) as client:
            first = client.solve(row, wait=120)
            publish(str(weights_dir), params[1], CONFIG, {"source": "test"})
            while time.monotonic() < deadline:
                if json.loads((state / "stats.json").read_text()).get("weights_version") == 1:
                    break
                time.sleep(0.2)
            second = client.solve(row, wait=120)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        for box in (inbox, outbox):
            with contextlib.suppress(MailboxNotFoundError):
                Mailbox.attach(box).unlink()
    stats = json.loads((state / "stats.json").read_text())
    assert stats["weights_version"] == 1 and stats["counts"]["weight_swaps"] == 1 and stats["backend"] == "jax"
    for version, answer in ((0, first), (1, second)):
        want = solver(weights.version_dir(weights_dir, version), tmp_path / "m").solve(
            torch.from_numpy(row[None]), torch.zeros(1, dtype=torch.int32), early_halt=True)
        np.testing.assert_array_equal(answer.prediction, want.logits.argmax(-1).numpy()[0])
