"""Two JAX processes on 127.0.0.1 clip gradients sharded across both.

``jax.distributed.initialize`` must run before any other JAX call, so the
processes are fresh interpreters (``mp_worker.py``), started here with a hard
deadline and killed by PID if they overrun. Each saves its results; they are
compared with the same clip run here, in a single process, on the full data.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from mp_worker import MAX_NORM, gradients

import optax_clip as oc

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
DEADLINE_S = 50.0
WORKER = Path(__file__).with_name("mp_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp):
    """Starts the processes; returns ``(exit codes, logs, result files)``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.pop("JAX_NUM_CPU_DEVICES", None)  # each worker sets its own count
    # The package and the worker module, wherever the tests are run from.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        [root, str(WORKER.parent)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    outs = [tmp / f"result{i}.npz" for i in range(NUM_PROCESSES)]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(NUM_PROCESSES)]
    procs = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        for i in range(NUM_PROCESSES):
            args = [i, NUM_PROCESSES, port, LOCAL_DEVICES, outs[i]]
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), *map(str, args)],
                    env=env,
                    stdout=logs[i],
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:  # only the processes this test started, by PID
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    text = []
    for f in logs:
        f.seek(0)
        text.append(f.read()[-4000:])
        f.close()
    return codes, text, outs


def _single_process():
    """The same clip on one device of this process, on the full gradients."""
    full = gradients()
    tx = oc.clip_by_global_norm(MAX_NORM)
    updates, state = jax.jit(tx.update)(full, tx.init(full))
    return full, jax.device_get(updates), float(state.clip_stats.pre_clip_norm)


def _np_norm(*arrays):
    return float(np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays)))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_clip_like_one(tmp_path):
    codes, logs, outs = _run_workers(tmp_path)
    assert codes == [0] * NUM_PROCESSES, "\n\n".join(logs)
    full, single_updates, single_norm = _single_process()
    norm = _np_norm(full["w"], full["r"])
    np.testing.assert_allclose(single_norm, norm, rtol=1e-6)
    n_dev = NUM_PROCESSES * LOCAL_DEVICES
    rows = full["w"].shape[0] // n_dev
    per_shard = [
        _np_norm(full["w"][d * rows : (d + 1) * rows], full["r"]) for d in range(n_dev)
    ]
    for i, out in enumerate(outs):
        res = np.load(out)
        assert int(res["process_id"]) == i and int(res["devices"]) == n_dev
        np.testing.assert_allclose(res["barrier"], n_dev)
        for how in ("jit", "shard_map"):
            np.testing.assert_allclose(res[f"{how}_norm"], norm, rtol=1e-5)
            np.testing.assert_allclose(res[f"{how}_norm"], single_norm, rtol=1e-5)
            for k in full:
                got = res[f"{how}_{k}"]
                np.testing.assert_allclose(got, single_updates[k], rtol=1e-5, atol=1e-6)
                want = np.asarray(full[k], np.float64) * MAX_NORM / norm
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # Without axis_name, each device only sees its own shard.
        np.testing.assert_allclose(res["per_shard_norms"], per_shard, rtol=1e-5)
        assert np.all(np.abs(res["per_shard_norms"] - norm) > 0.1 * norm)
        # pmap over local devices, psum across processes.
        w_norm = _np_norm(full["w"])
        np.testing.assert_allclose(res["pmap_w_norms"], w_norm, rtol=1e-5)
