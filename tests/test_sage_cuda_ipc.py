"""CUDA IPC hand-off between two processes through a sage mailbox (runs only where torch has CUDA;
`python -m pytest -q tests/test_sage_cuda_ipc.py`). The consumer writes into the tensor it opened
and the producer sees the write: both processes use one device allocation, nothing was copied."""

from __future__ import annotations

import multiprocessing
import struct

import pytest

torch = pytest.importorskip("torch")

from sage.cuda_ipc import open_cuda_tensor, share_cuda_tensor
from sage.mailbox import Mailbox
from tests.sage_helpers import remove_segments, unique_name

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a CUDA device")


def _consume(inbox: str, outbox: str) -> None:
    """Spawned consumer: open each tensor, report its sum, then add 1 in place."""
    box_in, box_out = Mailbox.attach(inbox), Mailbox.attach(outbox)
    for _ in range(2):
        tensor = open_cuda_tensor(box_in.pop(timeout=120).payload)
        total = float(tensor.float().sum())
        tensor.add_(1)
        torch.cuda.synchronize()
        box_out.push(struct.pack("<d", total) + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        del tensor


@needs_cuda
def test_cuda_tensor_crosses_processes_without_a_copy():
    inbox, outbox = unique_name("cin"), unique_name("cout")
    box_in = Mailbox.create(inbox, record_size=4096, capacity=4)
    box_out = Mailbox.create(outbox, record_size=256, capacity=4)
    consumer = multiprocessing.get_context("spawn").Process(target=_consume, args=(inbox, outbox), daemon=True)
    consumer.start()
    try:
        generator = torch.Generator(device="cuda").manual_seed(0)
        tensors = [torch.randn(64, 33, device="cuda", generator=generator),
                   torch.randn(5, 7, 3, device="cuda", generator=generator).to(torch.bfloat16)[:, ::2]]
        originals = [t.clone() for t in tensors]
        for tensor, original in zip(tensors, originals, strict=True):
            record = share_cuda_tensor(tensor)
            assert len(record) <= 4096
            box_in.push(record)
            reply = box_out.pop(timeout=120)
            assert reply is not None, "the consumer did not answer"
            total = struct.unpack_from("<d", reply.payload)[0]
            assert reply.payload[8:].decode() == f"{tensor.dtype}{tuple(tensor.shape)}"
            # The consumer summed before its in-place write, which `tensor` may already show.
            assert total == pytest.approx(float(original.float().sum()), rel=1e-5, abs=1e-3)
        torch.cuda.synchronize()
        for tensor, original in zip(tensors, originals, strict=True):
            assert torch.equal(tensor, original + 1)  # the consumer's in-place write is ours
        consumer.join(60)
        assert consumer.exitcode == 0
    finally:
        if consumer.is_alive():
            consumer.kill()
        for box, name in ((box_in, inbox), (box_out, outbox)):
            box.close()
            remove_segments(name)


def test_host_tensors_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="sage.ftm"):
        share_cuda_tensor(torch.zeros(3))
    with pytest.raises(TypeError, match="not a share_cuda_tensor record"):
        open_cuda_tensor(__import__("pickle").dumps([1, 2]))
