"""Does the fast-weight memory's read-out help HRM? A tiny HRM on a recall task, with and without it.

Task: each query is a key x (L symbols of V) whose answer depends on a secret s (L symbols) that was
shown once, earlier, and nowhere else:

    recall   y = s                 (the answer is the stored association)
    shift    y = (x + s) mod V     (the model must combine its input with what it recalls)

An episode draws M fresh associations (x_i, s_i). Study: each is written into a FastMemory
(sage/fast_memory.py; key k(x), value enc(s), enc = concatenated one-hot, d = L V; gate 1; one
memory episode per association). Test: the model sees x_i only, and reads with the same k(x_i).
Keys (--key): `input`, k(x) = enc(x); or a key of the model's own state, as a served model would
compute it: k(x) = P (h(x) - m), where h(x) is a state of the model on x at the L input positions,
flattened (an average over positions would keep only the bag of symbols), m the running mean of h
over the keys seen so far (without it every key shares the direction of the common component and
the memory addresses one slot), and P a fixed random Gaussian d x (L hidden) projection. h(x):
`embedding`, the model's input embedding (its scaled token embeddings, what the recurrence starts
from; flattening keeps the positions, which rotary encodings add only inside attention), or `z_H`,
the final z_H of one segment with an empty memory. The state key changes as the weights train;
study and test of one episode use the same weights, so a query reads with the key it was written
with. The associations are new in every episode, so no weight can hold them: without the memory
the best token accuracy is 1/V.

Where the read-out enters HRM: the puzzle-embedding position. puzzle_emb_ndim = d, so the read-out
r = V softmax(U^T k(x) / T) fills puzzle_emb_len = ceil(d / hidden) prepended positions, exactly
where a per-puzzle embedding row would go (export/torch_model.py HRMInner.embed); no layer changes.
The torch training step takes the rows through its opt-in batch["puzzle_rows"] (export/torch_train.py).

Arms, same seed, same initial weights, same episodes and steps:

    readout   the prepended position holds the memory's read-out
    empty     it holds zeros, what it holds when the memory is empty (the same model and data)

Evaluation on fresh episodes with M associations per memory, M in --eval-sizes (64 slots: beyond 64
the memory overwrites its least-used slots, so recall, and with it the ceiling, falls to about 64/M;
`memory_recall` reports that ceiling: the share of queries whose read-out decodes to their own s).
Accuracy as served (each row answers at the first segment where its Q head halts, as sage's engine
does) and over all halt_max_steps segments (the reference's evaluation) are both reported.

    python -m benchmarks.memory_readout [--task shift recall] [--steps 1500] [--seeds 0 1] [--key input embedding z_H]
        [--device cpu|cuda]

Writes benchmarks/results/memory_readout.{json,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from export.torch_train import TorchTrainer, model_from_params, segment
from hrm_jax.config import HRMConfig, TrainConfig
from hrm_jax.model import init_params
from sage.fast_memory import FastMemory, FastMemoryConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ARMS = ("readout", "empty")
TASKS = ("recall", "shift")
KEYS = ("input", "embedding", "z_H")


def model_config(length: int, symbols: int, hidden: int) -> HRMConfig:
    """A tiny HRM whose puzzle embedding is exactly one memory read-out (d = L V)."""
    return HRMConfig(seq_len=length, vocab_size=symbols + 1, num_puzzle_identifiers=1,
                     puzzle_emb_ndim=length * symbols, H_cycles=2, L_cycles=2, H_layers=1, L_layers=1,
                     hidden_size=hidden, expansion=2.0, num_heads=2, halt_max_steps=2, halt_exploration_prob=0.0,
                     forward_dtype="float32")


def one_hot(tokens: np.ndarray, symbols: int) -> np.ndarray:
    """[n, L] symbols -> [n, L V] concatenated one-hots."""
    return np.eye(symbols)[tokens].reshape(len(tokens), -1)


class StateKeys:
    """k(x) = P (h(x) - m): h the model's input embedding (layer "embedding") or its z_H after one segment
    with an empty memory (layer "z_H") at the input positions, flattened, centred by the running mean of
    the keys seen so far (this episode's included), projected to d."""

    def __init__(self, inner, dim: int, seed: int, layer: str, momentum: float = 0.99):
        width = inner.config.seq_len * inner.config.hidden_size
        self.inner, self.layer, self.momentum, self.mean = inner, layer, momentum, None
        self.projection = np.random.default_rng([seed, 3]).normal(0, width ** -0.5, (dim, width))

    @torch.no_grad()
    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        device = self.inner.H_init.device
        inputs = torch.from_numpy((tokens + 1).astype(np.int32)).to(device)
        ids = torch.zeros(len(tokens), dtype=torch.int32, device=device)
        rows = torch.zeros(len(tokens), self.inner.config.puzzle_emb_ndim, device=device)
        if self.layer == "embedding":
            state = self.inner.embed(inputs, ids, rows)
        else:
            z_H, z_L = self.inner.initial_state(len(tokens))
            state, *_ = segment(self.inner, z_H, z_L, inputs, ids, rows)
        prefix = self.inner.config.total_seq_len - self.inner.config.seq_len  # the puzzle position(s)
        pooled = state[:, prefix:].float().flatten(1).cpu().numpy().astype(np.float64)
        batch_mean = pooled.mean(0)
        self.mean = batch_mean if self.mean is None else self.momentum * self.mean + (1 - self.momentum) * batch_mean
        return (pooled - self.mean) @ self.projection.T


def episode(rng: np.random.Generator, size: int, length: int, symbols: int, task: str, slots: int,
            key_of=None) -> dict[str, np.ndarray]:
    """M fresh associations, studied into a new memory: the batch (tokens are symbol + 1; 0 is padding),
    the read-outs of its keys, and whether each read-out decodes to its own secret. key_of: symbols
    [M, L] -> keys [M, L V] (default: the concatenated one-hots of the input)."""
    keys, secrets = rng.integers(0, symbols, (size, length)), rng.integers(0, symbols, (size, length))
    answers = secrets if task == "recall" else (keys + secrets) % symbols
    memory = FastMemory(FastMemoryConfig(dim=length * symbols, slots=slots, seed=int(rng.integers(2**31))))
    encoded_keys = one_hot(keys, symbols) if key_of is None else key_of(keys)
    for key, secret in zip(encoded_keys, one_hot(secrets, symbols)):
        memory.begin_episode()
        memory.write(key, secret, 1.0)
    reads = np.stack([memory.read(key) for key in encoded_keys]).astype(np.float32)
    decoded = reads.reshape(size, length, symbols).argmax(-1)
    return {"inputs": (keys + 1).astype(np.int32), "labels": (answers + 1).astype(np.int32),
            "puzzle_identifiers": np.zeros(size, np.int32), "reads": reads,
            "recalled": np.all(decoded == secrets, axis=1) & (np.abs(reads).sum(1) > 0)}


def rows_for(arm: str, data: dict[str, np.ndarray], device: str = "cpu") -> torch.Tensor:
    return torch.from_numpy(data["reads"] if arm == "readout" else np.zeros_like(data["reads"])).to(device)


@torch.no_grad()
def predict(inner, data: dict[str, np.ndarray], rows: torch.Tensor) -> dict[str, np.ndarray]:
    """Argmax tokens from H_init/L_init two ways: "served", each row's answer at the first segment where
    its Q head halts (q_halt > q_continue, else the last: what sage's engine answers), and "all_segments",
    the last of halt_max_steps segments (the reference's evaluation)."""
    device = rows.device
    inputs = torch.from_numpy(data["inputs"]).to(device)
    ids = torch.from_numpy(data["puzzle_identifiers"]).to(device)
    z_H, z_L = inner.initial_state(len(inputs))
    served, done = None, torch.zeros(len(inputs), dtype=torch.bool, device=device)
    for _ in range(inner.config.halt_max_steps):
        z_H, z_L, logits, q_halt, q_continue = segment(inner, z_H, z_L, inputs, ids, rows)
        tokens = logits.argmax(-1)
        served = tokens if served is None else torch.where(done[:, None], served, tokens)
        done = done | (q_halt > q_continue)
    return {"served": served.cpu().numpy(), "all_segments": tokens.cpu().numpy()}


def train_arm(arm: str, task: str, seed: int, key: str, args) -> dict:
    config = model_config(args.length, args.symbols, args.hidden)
    torch.manual_seed(seed)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(seed)))
    model = model_from_params(params, config, args.device)
    train = TrainConfig(global_batch_size=args.batch, lr=args.lr, lr_warmup_steps=args.warmup, lr_min_ratio=1.0,
                        weight_decay=0.1, puzzle_emb_lr=0.0)
    trainer = TorchTrainer(model, train, args.steps)
    key_of = StateKeys(trainer.inner, args.length * args.symbols, seed, key) if key != "input" else None
    rng = np.random.default_rng([seed, 1])  # the same episodes for both arms
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        data = episode(rng, args.batch, args.length, args.symbols, task, args.slots, key_of)
        batch = {k: torch.from_numpy(data[k]).to(args.device) for k in ("inputs", "labels", "puzzle_identifiers")}
        rows = rows_for(arm, data, args.device)
        losses.append(float(trainer.step({**batch, "puzzle_rows": rows})["lm_loss"]) / args.batch)
    seconds = time.perf_counter() - start
    evals = {}
    test_rng = np.random.default_rng([seed, 2])
    for size in args.eval_sizes:
        hits, recalled = {"served": [], "all_segments": []}, []
        for _ in range(max(1, args.eval_queries // size)):
            data = episode(test_rng, size, args.length, args.symbols, task, args.slots, key_of)
            for mode, tokens in predict(trainer.inner, data, rows_for(arm, data, args.device)).items():
                hits[mode].append(tokens == data["labels"])
            recalled += list(data["recalled"])
        served, full = (np.concatenate(hits[mode]) for mode in ("served", "all_segments"))
        evals[str(size)] = {"exact_accuracy": float(served.all(1).mean()), "token_accuracy": float(served.mean()),
                            "exact_accuracy_all_segments": float(full.all(1).mean()),
                            "token_accuracy_all_segments": float(full.mean()),
                            "memory_recall": float(np.mean(recalled)), "queries": len(served)}
    return {"arm": arm, "task": task, "seed": seed, "key": key, "train_seconds": seconds,
            "loss_first_last": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))], "eval": evals}


def plot(rows: list[dict], symbols: int, path: str) -> None:
    """Exact and token accuracy as served against the memory's load: a pair of rows of panels per task,
    a column per key; lines per arm and seed; the dotted line is that key's memory recall (the ceiling)."""
    tasks = sorted({r["task"] for r in rows})
    keys = [k for k in KEYS if any(r.get("key", "input") == k for r in rows)]
    fig, axes = plt.subplots(2 * len(tasks), len(keys), figsize=(4.6 * len(keys), 3.0 * 2 * len(tasks)),
                             squeeze=False)
    for t, task in enumerate(tasks):
        for column, key in enumerate(keys):
            # the empty arm reads zeros whatever the key: shown in every panel of its task
            group = [r for r in rows if r["task"] == task and (r.get("key", "input") == key or r["arm"] == "empty")]
            for m, metric in enumerate(("exact_accuracy", "token_accuracy")):
                ax = axes[2 * t + m, column]
                for arm, style in zip(ARMS, ("-o", "--s")):
                    for row in (r for r in group if r["arm"] == arm):
                        sizes = sorted(int(n) for n in row["eval"])
                        ax.plot(sizes, [row["eval"][str(n)][metric] for n in sizes], style,
                                label=f"{arm} (seed {row['seed']})")
                first = next(r for r in group if r["arm"] == "readout")
                sizes = sorted(int(n) for n in first["eval"])
                ax.plot(sizes, [first["eval"][str(n)]["memory_recall"] for n in sizes], ":", color="gray",
                        label="memory recall (ceiling)")
                if metric == "token_accuracy":
                    ax.axhline(1 / symbols, color="black", lw=0.6, label="chance 1/V")
                ax.set(title=f"{task}, {key} key", xscale="log", xlabel="associations per memory (64 slots)",
                       ylabel=metric.replace("_", " ") + " (served)", ylim=(-0.02, 1.02))
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--key", nargs="+", choices=KEYS, default=["input"],
                        help="what the memory is keyed by (the empty arm runs once, with the first)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="queries per step, all from one memory of that size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--length", type=int, default=6, help="L, symbols per key and secret")
    parser.add_argument("--symbols", type=int, default=8, help="V")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64, help="memory slots r")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--eval-queries", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(1)  # spin-waiting OpenMP threads slow down by 10x and more on a CPU other jobs share
    rows = []
    for task in args.task:
        for seed in args.seeds:
            for key in args.key:
                for arm in ARMS if key == args.key[0] else ("readout",):
                    row = train_arm(arm, task, seed, key, args)
                    rows.append(row)
                    accuracy = "  ".join(f"M={m}: {v['exact_accuracy']:.3f}/{v['token_accuracy']:.3f}"
                                         f" ({v['exact_accuracy_all_segments']:.3f}/"
                                         f"{v['token_accuracy_all_segments']:.3f}) ceiling {v['memory_recall']:.3f}"
                                         for m, v in row["eval"].items())
                    print(f"{task:6s} seed {seed} {key:9s} {arm:7s} loss {row['loss_first_last'][0]:.3f} -> "
                          f"{row['loss_first_last'][1]:.3f} ({row['train_seconds']:.0f} s)  exact/token served "
                          f"(all segments) {accuracy}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "torch": torch.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with open(os.path.join(args.out, "memory_readout.json"), "w") as f:
        json.dump({"settings": vars(args), "machine": machine, "rows": rows}, f, indent=1)
    plot(rows, args.symbols, os.path.join(args.out, "memory_readout.png"))
    print(f"wrote {os.path.join(args.out, 'memory_readout.json')} and .png")

if __name__ == "__main__":
    main()
