"""Probe: does unrolling TRM's recursion loops speed up the jitted train step? Same process, same batches."""
import json, os, sys
import jax
from benchmarks import common
from benchmarks.train_step import random_batches
from benchmarks.trm_train_step import configs, bench_jax
import hrm_jax.trm as trm
from hrm_jax.train import init_train_state

orig_recursion, orig_inner = trm.recursion, trm.inner_forward

def recursion_unrolled(dense, config, z_H, z_L, x, cos_sin):
    for _ in range(config.L_cycles):
        z_L = trm._apply(config, dense, trm.TRMInner.net, z_L, z_H + x, cos_sin)
    return trm._apply(config, dense, trm.TRMInner.net, z_H, z_L, cos_sin), z_L

def inner_unrolled(dense, config, z_H, z_L, x):
    cos_sin = trm._cos_sin(config)
    frozen, x_frozen = jax.lax.stop_gradient(dense), jax.lax.stop_gradient(x)
    for _ in range(config.H_cycles - 1):
        z_H, z_L = recursion_unrolled(frozen, config, z_H, z_L, x_frozen, cos_sin)
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
    return recursion_unrolled(dense, config, z_H, z_L, x, cos_sin)

def inner_last_unrolled(dense, config, z_H, z_L, x):
    cos_sin = trm._cos_sin(config)
    frozen, x_frozen = jax.lax.stop_gradient(dense), jax.lax.stop_gradient(x)
    z_H, z_L = jax.lax.fori_loop(0, config.H_cycles - 1,
                                 lambda _, z: orig_recursion(frozen, config, *z, x_frozen, cos_sin), (z_H, z_L))
    z_H, z_L = jax.lax.stop_gradient(z_H), jax.lax.stop_gradient(z_L)
    return recursion_unrolled(dense, config, z_H, z_L, x, cos_sin)

common.share_gpu_with_torch()
model, train, total = configs(False, int(os.environ.get("BATCH", 768)))
batches = random_batches(model, train.global_batch_size, 8)
rows = {}
for name, inner in [("fori (current)", orig_inner), ("last recursion unrolled", inner_last_unrolled),
                    ("all unrolled", inner_unrolled), ("fori again", orig_inner)]:
    trm.inner_forward = inner
    jax.clear_caches()
    state = init_train_state(model, train, total)
    r = bench_jax(model, train, total, state, batches, 20, 5)
    rows[name] = {k: r[k] for k in ("median_s", "examples_per_s", "mfu", "peak_memory_gib")}
    print(f"{name:>26}: {1e3*r['median_s']:.2f} ms  {r['examples_per_s']:.0f} ex/s  mfu {r['mfu']:.3f}  "
          f"peak {r['peak_memory_gib']:.1f} GiB", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "unroll_probe.json"), "w"), indent=1)
