"""Tests of ``python -m optax_clip.demo`` (tiny settings) and its helpers."""

import math

import numpy as np
import pytest

from optax_clip import demo

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def test_adding_problem_targets():
    x, y = demo.adding_problem(np.random.default_rng(1), batch_size=64, seq_len=12)
    assert x.shape == (64, 12, 2) and y.shape == (64,)
    assert x.dtype == np.float32 and y.dtype == np.float32
    markers = x[..., 1]
    assert set(np.unique(markers)) == {0.0, 1.0}
    first, second = markers[:, :6], markers[:, 6:]
    assert (first.sum(axis=1) == 1).all() and (second.sum(axis=1) == 1).all()
    marked = np.nonzero(markers)
    expected = np.zeros(64)
    np.add.at(expected, marked[0], x[..., 0][marked])
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()


@pytest.mark.slow
def test_demo_main(tmp_path, capsys):
    out = tmp_path / "sub" / "demo.png"
    steps = 20
    methods = ["none", "clip_by_global_norm"]
    results = demo.main(
        ["--steps", str(steps), "--seq-len", "8", "--methods", *methods,
         "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert f"Wrote {out.resolve()}" in printed
    assert [r.method for r in results] == methods
    none, clipped = results
    for r in results:
        assert r.losses.shape == r.grad_norms.shape == (steps,)
        assert np.isfinite(r.losses).all() and np.isfinite(r.grad_norms).all()
        assert r.nonfinite_steps == 0
        assert 0 < r.best_loss <= r.final_loss
        assert r.best_loss == pytest.approx(np.min(r.eval_losses))
        assert r.max_grad_norm == pytest.approx(np.max(r.grad_norms))
        assert list(r.eval_steps)[-1] == steps
        row = next(line for line in printed.splitlines() if f"| {r.method} |" in line)
        assert f"{r.final_loss:.4f}" in row
    # Same initialisation and the same first batch: the first step is identical.
    assert none.losses[0] == clipped.losses[0]
    assert none.grad_norms[0] == pytest.approx(clipped.grad_norms[0], rel=1e-6)
    # No clipper, no statistics; the clipper clipped exactly the steps whose
    # pre-clip norm (measured independently by the demo) exceeded its threshold.
    assert none.clip_fraction is None
    np.testing.assert_array_equal(clipped.clipped, clipped.grad_norms > 1.0)
    assert clipped.clip_fraction == pytest.approx(np.mean(clipped.grad_norms > 1.0))


def test_demo_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--seed", "--seeds", "--seq-len", "--methods", "--out"):
        assert flag in text
    with pytest.raises(SystemExit) as exc:
        demo.main(["--methods", "no_such_method"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "0"])
    assert exc.value.code == 2


def _result(method, seed, final, nonfinite=0):
    return demo.RunResult(
        method=method,
        seed=seed,
        losses=np.array([1.0] * (3 - nonfinite) + [math.nan] * nonfinite),
        grad_norms=np.array([2.0, math.inf, 1.0]),
        clipped=None,
        eval_steps=np.array([3]),
        eval_losses=np.array([final]),
        wall_time=0.5,
    )


def test_outcome_and_tables():
    runs = [
        _result("none", 0, math.nan, nonfinite=2),
        _result("none", 1, 1e6),
        _result("clip", 0, 0.01),
        _result("clip", 1, 0.1),
    ]
    assert [demo.outcome(r) for r in runs] == [
        "diverged",
        "diverged",
        "trained",
        "stalled",
    ]
    assert runs[0].nonfinite_steps == 2 and runs[0].max_grad_norm == math.inf
    table = demo.format_seed_table(runs)
    assert "| none | nan | 1e+06 | 0/2 | 2/2 |" in table
    assert "| clip | 0.0100 | 0.1000 | 1/2 | 0/2 |" in table
    table = demo.format_table(runs[:1])
    assert "| none | diverged | nan | nan | 2 | - | inf | 0.5 |" in table


def test_methods_table_is_complete():
    required = {
        "none",
        "clip_by_value",
        "clip_by_global_norm",
        "clip_by_block_norm",
        "zclip",
    }
    assert required <= set(demo.METHODS)
    for make in demo.METHODS.values():
        tx = make()
        assert hasattr(tx, "init") and hasattr(tx, "update")
