"""The measurements behind the numerics guide and the AdaGC trap run (tiny sizes)."""

from benchmarks import adagc_trap, fail_fast


def test_fail_fast_benchmark_runs(capsys):
    out = fail_fast.main(["--leaves", "2", "--size", "1024", "--reps", "3"])
    assert out["raise_ms"] > 0 and out["propagate_ms"] > 0
    assert "raise / propagate" in capsys.readouterr().out


def test_adagc_trap_benchmark_reproduces_the_trap(capsys):
    rows = adagc_trap.main(["--seeds", "1", "--steps", "300"])
    share = {(r["variant"], r["spike"]): r["clipped"] / r["tensor_steps"] for r in rows}
    authors, remedy = "adagc (authors' rule)", "adagc, warmup_max_drop=1.04"
    assert share[authors, True] > share[authors, False] + 0.1  # the trap
    assert abs(share[remedy, True] - share[remedy, False]) < 0.05  # no trap
    assert "tensor-steps clipped" in capsys.readouterr().out
