"""One process of the 2-process test (``test_multiprocess.py``); not a test module.

Run as ``python mp_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT``.
It joins a JAX cluster on 127.0.0.1 (CPU collectives through gloo), builds a
global mesh over every process's devices, clips gradients that are sharded
across the processes (sharded ``jit``, ``shard_map`` with and without
``axis_name``, and ``pmap``) and saves what it got, gathered to the host, to
``OUT`` (an ``.npz`` file). The test compares it with a single-process run.
"""

import os
import sys

import numpy as np

ROWS = 16  # rows of the sharded leaf "w": divisible by every device count used
MAX_NORM = 1.0


def gradients():
    """The full (global) gradients, identical in every process."""
    rng = np.random.default_rng(42)
    return {
        "w": rng.normal(size=(ROWS, 4)).astype(np.float32),
        "r": rng.normal(size=(3,)).astype(np.float32),  # replicated
    }


def main(process_id, num_processes, port, local_devices, out):
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Before any other JAX call (pitfall M4), with short timeouts (M3).
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_clip as oc

    n = jax.device_count()
    assert n == num_processes * local_devices, n
    assert jax.process_count() == num_processes
    mesh = jax.make_mesh((n,), ("data",))  # global mesh, Explicit axes
    specs = {"w": P("data"), "r": P()}
    full = gradients()
    rows = ROWS // num_processes
    local = {
        "w": full["w"][process_id * rows : (process_id + 1) * rows],
        "r": full["r"],
    }
    grads = {
        k: jax.make_array_from_process_local_data(
            NamedSharding(mesh, specs[k]), local[k], full[k].shape
        )
        for k in full
    }

    def to_host(x):
        # A replicated copy, waited for as a whole before reading (pitfall M2).
        rep = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))(x)
        jax.block_until_ready(rep)
        return np.asarray(rep.addressable_data(0))

    results = {}

    # Sharded jit: no axis_name, XLA reduces across processes.
    tx = oc.clip_by_global_norm(MAX_NORM)
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    results["jit_norm"] = to_host(state.clip_stats.pre_clip_norm)
    for k in full:
        results[f"jit_{k}"] = to_host(updates[k])

    # shard_map with axis_name ("r" is replicated: counted once).
    tx = oc.clip_by_global_norm(MAX_NORM, axis_name="data")

    def clip(g):
        u, s = tx.update(g, tx.init(g))
        return u, s.clip_stats.pre_clip_norm

    fn = jax.jit(
        jax.shard_map(clip, mesh=mesh, in_specs=(specs,), out_specs=(specs, P()))
    )
    updates, norm = fn(grads)
    results["shard_map_norm"] = to_host(norm)
    for k in full:
        results[f"shard_map_{k}"] = to_host(updates[k])

    # shard_map without axis_name: every device sees only its own shard.
    plain = oc.clip_by_global_norm(MAX_NORM)

    def per_shard(g):
        return plain.update(g, plain.init(g))[1].clip_stats.pre_clip_norm[None]

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(specs,),
            out_specs=P("data"),
            check_vma=False,
        )
    )
    results["per_shard_norms"] = to_host(fn(grads))

    # pmap over the local devices, psum across all processes.
    def pmapped(w):
        return tx_i.update({"w": w}, tx_i.init({"w": w}))[1].clip_stats.pre_clip_norm

    tx_i = oc.clip_by_global_norm(MAX_NORM, axis_name="i")
    w_local = local["w"].reshape((local_devices, -1) + local["w"].shape[1:])
    results["pmap_w_norms"] = np.asarray(jax.pmap(pmapped, axis_name="i")(w_local))

    # A final cross-process barrier whose result is waited for in full.
    ones = jax.device_put(np.ones((n,), np.float32), NamedSharding(mesh, P("data")))
    total = jax.jit(
        jax.shard_map(
            lambda v: lax.psum(v, "data"), mesh=mesh, in_specs=P("data"), out_specs=P()
        )
    )(ones)
    jax.block_until_ready(total)
    results["barrier"] = to_host(total)

    np.savez(out, process_id=process_id, devices=n, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, nproc, port, ndev = (int(a) for a in sys.argv[1:5])
    main(pid, nproc, port, ndev, sys.argv[5])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, which can hang on gloo threads (M2)
