"""`python -m sage serve` end to end on a tiny random-weight HRM exported to ONNX (export/onnx.py).

The model is exported once per module (about 15-30 s on 2 shared cores); servers run in a thread of
the test process where a signal is not needed, and as `python -m sage serve` subprocesses for
SIGTERM and restart. ONNX Runtime runs with one intra-op thread, so that a computation is
bit-reproducible between runs (the carry-resume check compares bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx import export_onnx
from export.torch_model import HRMTorch
from hrm_jax.presets import tiny
from sage.__main__ import main as sage_main
from sage.backends import ModelError, OnnxBackend, TorchBackend, load_backend
from sage.carry import CarryStore
from sage.client import Client, ServerUnavailableError
from sage.journal import Journal
from sage.mailbox import Mailbox, MailboxNotFoundError
from sage.protocol import Request, Status, decode_response, encode_request
from sage.serve import Server, journal_entry, open_or_create
from tests.sage_helpers import running

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny(halt_max_steps=4, H_cycles=2, L_cycles=1, H_layers=1, L_layers=1, hidden_size=32, num_heads=2)
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def random_model(seed: int = 0) -> HRMTorch:
    """Random weights scaled so that early halting varies: about 40% of inputs stop after one segment."""
    model = HRMTorch(CONFIG, "float32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / max(1, tensor.shape[-1]) ** 0.5)
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch_model = random_model()
    path = export_onnx(torch_model, tmp_path_factory.mktemp("model") / "tiny.segment.onnx", "segment")
    return torch_model, path


def name(tag: str) -> str:
    return f"t{os.getpid()}-{tag}-{time.monotonic_ns() % 10**9}"


def puzzles(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, CONFIG.vocab_size, (n, CONFIG.seq_len)).astype(np.int32)


@contextlib.contextmanager
def thread_server(model_path, state_dir, capacity=256, focus=False, **kwargs):
    inbox, outbox = name("in"), name("out")
    boxes = [open_or_create(inbox, 4096, capacity), open_or_create(outbox, 4096, capacity)]
    if focus:
        boxes.append(open_or_create(inbox + "-focus", 4096, capacity))
    server = Server(OnnxBackend(model_path, threads=1), *boxes[:2], Path(state_dir),
                    focus=boxes[2] if focus else None, **kwargs)
    with running(server, boxes, join_timeout=30):
        yield server, inbox


def test_answers_equal_the_in_process_solver(model, tmp_path, capsys):
    torch_model, path = model
    inputs = puzzles(24, seed=1)
    with thread_server(path, tmp_path, max_batch=8, max_wait=0.01) as (server, inbox), Client(inbox) as client:
        ids = [client.submit(row) for row in inputs]
        answers = [client.wait(i) for i in ids]
        assert sage_main(["solve", PUZZLE, "--inbox", inbox]) == 1  # a random model: not a valid solution
        server.write_stats()
    want = torch_model.solve(torch.from_numpy(inputs), torch.zeros(24, dtype=torch.int32), early_halt=True)
    assert all(a.status is Status.OK for a in answers)
    np.testing.assert_array_equal(np.stack([a.prediction for a in answers]), want.logits.argmax(-1).numpy())
    np.testing.assert_array_equal([a.steps for a in answers], want.steps.numpy())
    np.testing.assert_allclose([a.q_halt for a in answers], want.q_halt_logits.numpy(), rtol=0, atol=1e-4)
    assert len(set(want.steps.tolist())) > 1  # the inputs really halt at different segments
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["counts"]["answers_ok"] == 25 and stats["batch_size"]["mean"] > 1
    out = capsys.readouterr().out
    assert "ACT steps" in out and len(out.splitlines()) == 10
    assert sage_main(["stats", "--state-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "answers ok 25" in table and "latency p50/p95/p99" in table
    assert sage_main(["stats", "--state-dir", str(tmp_path), "--prometheus"]) == 0
    assert 'sage_answers_total{status="ok"} 25.0' in capsys.readouterr().out


def test_focus_inbox_gets_through_a_flood_that_fills_the_inbox(model, tmp_path):
    """Priority inside the server is not enough when the periphery fills the inbox ring itself: the
    focus inbox has its own ring, is read first and ranks ahead, so its request is answered while
    most of the flood still waits."""
    _, path = model
    with thread_server(path, tmp_path, capacity=16, focus=True, max_batch=2, max_pending=8) as (_, inbox), \
            Client(inbox, focus_inbox=inbox + "-focus") as client:
        flood = []
        with contextlib.suppress(ServerUnavailableError):
            while len(flood) < 200:
                flood.append(client.submit(puzzles(1, seed=len(flood))[0], block=0.001))
        assert len(flood) < 200  # the inbox ring is full: further pushes answer FULL
        urgent = client.submit(puzzles(1, seed=99)[0], focus=True, block=0.001)
        assert client.wait(urgent, 60).status is Status.OK
        answered_before = len(client._answers)  # flood answers that arrived while we waited
        assert answered_before < len(flood) // 2, (answered_before, len(flood))
        assert all(client.wait(i, 60).status is Status.OK for i in flood)


def test_a_client_that_left_does_not_take_the_server_down(model, tmp_path):
    """Answers for a reply mailbox that was unlinked, or never valid, are counted as undelivered."""
    _, path = model
    with thread_server(path, tmp_path) as (server, inbox), Client(inbox) as client:
        gone = Mailbox.create(name("gone"), record_size=4096, capacity=4)
        gone.unlink()  # the client left before its answer came
        for reply_to in (gone.name, "not a mailbox name!"):
            client.inbox.push(encode_request(Request(7, puzzles(1, seed=10)[0], reply_to=reply_to)))
        assert client.solve(puzzles(1, seed=11)[0], wait=60).status is Status.OK  # still serving
        server.write_stats()
    gone.close()
    assert json.loads((tmp_path / "stats.json").read_text())["counts"]["undelivered_no_reply_mailbox"] == 2


def test_torch_backend_matches_onnx_backend(model):
    torch_model, path = model
    onnx, torch_backend = OnnxBackend(path, threads=1), TorchBackend(torch_model)
    inputs, ids = puzzles(3, seed=2), np.zeros(3, np.int32)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 3, CONFIG.total_seq_len, CONFIG.hidden_size)).astype(np.float32)
    fresh = np.array([True, False, False])
    a, b = onnx.step(z[0], z[1], fresh, inputs, ids), torch_backend.step(z[0], z[1], fresh, inputs, ids)
    np.testing.assert_allclose(a.z_H, b.z_H, atol=1e-5)
    np.testing.assert_allclose(a.q_halt, b.q_halt, atol=1e-5)
    np.testing.assert_array_equal(a.predictions, b.predictions)


def test_model_resolution(model, tmp_path):
    torch_model, path = model
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(weights))
    with pytest.raises(ModelError, match="needs its model config"):
        load_backend(weights, "torch")
    (tmp_path / "tiny.json").write_text(json.dumps(CONFIG.to_dict()))
    backend = load_backend(weights, "torch")  # the config JSON beside the weights
    assert backend.name == "torch" and backend.config == CONFIG
    assert load_backend(path, "onnx").config == CONFIG
    with pytest.raises(ModelError, match="needs the weights"):
        load_backend(path, "torch")
    # A solve graph (here: the segment file relabelled) resolves to the segment graph beside it.
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == "hrm_graph").value = "solve"
    onnx.save(proto, str(tmp_path / "m.onnx"))
    with pytest.raises(ModelError, match="--graph both"):
        load_backend(tmp_path / "m.onnx", "onnx")
    shutil.copy(path, tmp_path / "m.segment.onnx")
    assert load_backend(tmp_path / "m.onnx", "onnx").path == tmp_path / "m.segment.onnx"


def test_journal_replay_answers_what_a_killed_server_had_taken(model, tmp_path):
    """The mechanism behind "no acknowledged request lost" across SIGKILL: requests taken and not
    answered are in the journal, and the next server answers them first."""
    _, path = model
    inputs = puzzles(3, seed=4)
    reply = Mailbox.create(name("reply"), record_size=4096, capacity=16)
    journal = Journal(tmp_path / "journal.log")
    for i, row in enumerate(inputs):
        journal.begin(journal_entry(encode_request(Request(100 + i, row, reply_to=reply.name))))
    journal.close()
    try:
        with thread_server(path, tmp_path):
            got = sorted(answered_id(reply.pop(timeout=20)) for _ in inputs)
    finally:
        reply.unlink()
        reply.close()
    assert got == [100, 101, 102]
    assert Journal(tmp_path / "journal.log").unfinished() == []


def answered_id(record) -> int:
    assert record is not None
    response = decode_response(record.payload)
    assert response.status is Status.OK
    return response.request_id


def start_server(path, inbox, state_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sage", "serve", "--model", str(path), "--inbox", inbox,
                             "--outbox", inbox + "-out", "--state-dir", str(state_dir), "--threads", "1",
                             "--max-batch", "8"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    give_up = time.monotonic() + 90
    while time.monotonic() < give_up:
        with contextlib.suppress(MailboxNotFoundError):
            box = Mailbox.attach(inbox)
            alive = box.creator.pid == proc.pid
            box.close()
            if alive:
                return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start in 90 s")


def stream_answers(client, inputs, stream):
    out = []
    for row in inputs:
        r = client.wait(client.submit(row, stream=stream), 60)
        assert r.status is Status.OK
        out.append((r.prediction.tobytes(), np.float32(r.q_halt).tobytes(), r.steps))
    return out


def test_sigterm_restart_resumes_carries_and_loses_no_acknowledged_request(model, tmp_path):
    _, path = model
    frames = puzzles(3, seed=5)
    with thread_server(path, tmp_path / "reference") as (_, inbox), Client(inbox) as client:
        uninterrupted = stream_answers(client, frames, "cam")

    inbox, state = name("srv"), tmp_path / "state"
    first = start_server(path, inbox, state)
    try:
        with Client(inbox) as client:
            resumed = stream_answers(client, frames[:1], "cam")
            backlog = [client.submit(row) for row in puzzles(40, seed=6)]  # acknowledged: submit returned
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0, first.stdout.read().decode()
            assert CarryStore(state / "carries", 1, (1, 1), np.float32).path_for("cam").is_file()
            assert json.loads((state / "stats.json").read_text())["stopped"] is True
            second = start_server(path, inbox, state)
            try:
                resumed += stream_answers(client, frames[1:], "cam")
                answers = [client.wait(i, 60) for i in backlog]
                second.send_signal(signal.SIGTERM)
                assert second.wait(60) == 0
            finally:
                second.kill()
            assert client.replies.pop(timeout=0.2) is None and client.duplicates == 0  # each answered once
    finally:
        first.kill()
        with contextlib.suppress(MailboxNotFoundError):
            for box_name in (inbox, inbox + "-out"):
                Mailbox.attach(box_name).unlink()
    assert resumed == uninterrupted  # bit-exact: predictions, q_halt bytes and steps
    assert all(a.status is Status.OK for a in answers)


def _one_line_error(capsys, argv, match):
    assert sage_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_cli_errors_are_one_line_with_exit_code_2(model, tmp_path, capsys):
    _, path = model
    _one_line_error(capsys, ["solve", "12345", "--inbox", "x"], "81 cells")
    _one_line_error(capsys, ["solve", PUZZLE, "--inbox", name("missing")], "no mailbox")
    dead = name("dead")
    subprocess.run([sys.executable, "-c", (f"from sage.mailbox import Mailbox; Mailbox.create({dead!r}, "
                    "record_size=64, capacity=4)")], cwd=ROOT, check=True)
    try:
        _one_line_error(capsys, ["solve", PUZZLE, "--inbox", dead], "is not running")
    finally:
        Mailbox.attach(dead).unlink()
    base = ["serve", "--inbox", name("i"), "--outbox", name("o"), "--state-dir", str(tmp_path)]
    _one_line_error(capsys, base + ["--model", str(tmp_path / "nope.onnx")], "no such file")
    _one_line_error(capsys, base + ["--model", str(path), "--backend", "torch"], "needs the weights")
    _one_line_error(capsys, ["stats", "--state-dir", str(tmp_path / "empty")], "no server has run")


@pytest.mark.slow
def test_sigkill_restart_answers_every_acknowledged_request(model, tmp_path):
    """SIGKILL mid-batch: the next server replays the journal, so each acknowledged request is
    answered at least once (an answer sent just before the kill may come twice; the client drops it)."""
    _, path = model
    inbox, state = name("kill"), tmp_path / "state"
    first = start_server(path, inbox, state)
    try:
        with Client(inbox) as client:
            ids = [client.submit(row) for row in puzzles(60, seed=7)]
            first_answer = client.wait(ids[0], 60)  # the server is working through the backlog
            first.kill()
            first.wait(30)
            journal = Journal(state / "journal.log")
            assert len(journal.unfinished()) > 0  # taken from the inbox, unanswered: only the journal has them
            journal.close()
            second = start_server(path, inbox, state)
            try:
                answers = [first_answer] + [client.wait(i, 60) for i in ids[1:]]
                second.send_signal(signal.SIGTERM)
                assert second.wait(60) == 0
            finally:
                second.kill()
    finally:
        first.kill()
        with contextlib.suppress(MailboxNotFoundError):
            for box_name in (inbox, inbox + "-out"):
                Mailbox.attach(box_name).unlink()
    assert [a.request_id for a in answers] == ids and all(a.status is Status.OK for a in answers)
    assert Journal(state / "journal.log").unfinished() == []


@pytest.mark.slow  # orbax save/restore twice and a jit compile: ~35 s on 2 shared cores
def test_jax_and_torch_backends_from_one_orbax_checkpoint_agree(tmp_path):
    import jax

    from hrm_jax.checkpoint import save_params
    from hrm_jax.model import init_params

    params = jax.device_get(init_params(CONFIG, jax.random.key(1)))
    save_params(tmp_path / "ckpt", params, CONFIG)
    jax_backend, torch_backend = load_backend(tmp_path / "ckpt", "jax"), load_backend(tmp_path / "ckpt", "torch")
    rng = np.random.default_rng(8)
    z = rng.standard_normal((2, 3, CONFIG.total_seq_len, CONFIG.hidden_size)).astype(np.float32)
    fresh, inputs, ids = np.array([True, False, True]), puzzles(3, seed=9), np.zeros(3, np.int32)
    a, b = jax_backend.step(z[0], z[1], fresh, inputs, ids), torch_backend.step(z[0], z[1], fresh, inputs, ids)
    np.testing.assert_allclose(a.z_H, b.z_H, atol=1e-4)
    np.testing.assert_allclose(a.q_halt, b.q_halt, atol=1e-4)
    np.testing.assert_array_equal(a.predictions, b.predictions)


def test_the_onnx_backend_runs_without_jax_or_torch(model, tmp_path):
    """An edge device with numpy and onnxruntime only: jax and torch are made unimportable in a fresh process."""
    torch_model, path = model
    script = (
        "import sys; sys.modules['jax'] = None; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from sage.backends import load_backend\n"
        f"backend = load_backend({str(path)!r}, 'onnx', cache_dir={str(tmp_path)!r}, threads=1)\n"
        "from sage.backends import carry_shape\n"
        "config = backend.config\n"
        "z = np.zeros((2, *carry_shape(config)), backend.carry_dtype)\n"
        "out = backend.step(z, z, np.ones(2, bool), np.ones((2, config.seq_len), np.int32), np.zeros(2, np.int32))\n"
        "assert out.predictions.shape == (2, config.seq_len), out.predictions.shape\n"
        "assert 'jax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_shipped_model_is_a_model_the_server_reads(tmp_path):
    from hrm_jax.pretrained import heldout_sample, load_pretrained
    from sage.backends import carry_shape, load_backend

    backend = load_backend("pretrained", "torch", cache_dir=tmp_path, threads=1)
    assert backend.config == load_pretrained()[1]
    puzzle, solution = heldout_sample()["news"][0]
    z_H = z_L = np.zeros((1, *carry_shape(backend.config)), backend.carry_dtype)
    fresh = np.ones(1, bool)
    for _ in range(backend.config.halt_max_steps):  # the ACT loop the engine runs, for one row
        out = backend.step(z_H, z_L, fresh, puzzle.astype(np.int32)[None] + 1, np.zeros(1, np.int32))
        z_H, z_L, fresh = out.z_H, out.z_L, np.zeros(1, bool)
        if out.q_halt[0] > out.q_continue[0]:
            break
    np.testing.assert_array_equal(out.predictions[0] - 1, solution)
