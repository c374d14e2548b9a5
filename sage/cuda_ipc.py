"""Device tensors between processes on one GPU machine: CUDA IPC through torch.multiprocessing.

    record = share_cuda_tensor(tensor)          # producer: a few hundred bytes naming the allocation
    mailbox.push(record)                        # any PBM ring with record_size >= len(record)
    tensor = open_cuda_tensor(mailbox.pop(timeout=1).payload)   # consumer: the same device memory

The bytes are torch's own CUDA IPC reduction (cudaIpcGetMemHandle plus torch's reference-counting
file), pickled with multiprocessing's ForkingPickler into which torch.multiprocessing registers it;
no data is copied. torch's rules apply: the producer keeps the tensor alive until every consumer is
done with it, and consumers open it in processes started with the "spawn" method (CUDA cannot be
forked). The payload is a pickle: exchange it only between trusted processes of one machine.
Host tensors go through sage.ftm instead. torch is optional: without it, or without CUDA, the
functions raise RuntimeError saying so.
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

try:  # optional: sage runs without torch
    import torch
    import torch.multiprocessing
except ImportError:  # pragma: no cover - exercised where torch is absent
    torch = None


def cuda_ipc_available() -> bool:
    return torch is not None and torch.cuda.is_available()


def share_cuda_tensor(tensor) -> bytes:
    """The IPC record of a CUDA tensor (its storage handle, offset, size, stride, dtype)."""
    if torch is None:
        raise RuntimeError("CUDA IPC needs torch: pip install torch (with CUDA) or use sage.ftm for host tensors")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        raise ValueError(f"share_cuda_tensor takes a CUDA torch.Tensor, got "
                         f"{getattr(tensor, 'device', type(tensor).__name__)}; host tensors go through sage.ftm")
    buffer = io.BytesIO()
    ForkingPickler(buffer, pickle.HIGHEST_PROTOCOL).dump(tensor)
    return buffer.getvalue()


def open_cuda_tensor(record: bytes):
    """The producer's CUDA tensor, mapped into this process (same device memory, no copy)."""
    if torch is None:
        raise RuntimeError("CUDA IPC needs torch: pip install torch (with CUDA)")
    tensor = pickle.loads(record)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"not a share_cuda_tensor record (it holds a {type(tensor).__name__})")
    return tensor
