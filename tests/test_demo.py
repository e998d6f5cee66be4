"""Tests of ``python -m optax_clip.demo`` (tiny settings) and its helpers."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optax_clip import demo

ROOT = Path(__file__).resolve().parents[1]


def run_demo_without(blocked, *args):
    """``python -m optax_clip.demo ARGS`` in a process where ``blocked`` modules
    cannot be imported (``sys.modules[name] = None``), as in an install without
    the ``examples`` extra."""
    code = (
        "import runpy, sys\n"
        f"for name in {tuple(blocked)!r}:\n"
        "    sys.modules[name] = None\n"
        "sys.argv = ['optax_clip.demo', *sys.argv[1:]]\n"
        "runpy.run_module('optax_clip.demo', run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_help_works_without_the_examples_extra():
    proc = run_demo_without(demo.EXTRAS, "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--steps", "--seeds", "--methods", "--out"):
        assert flag in proc.stdout
    assert 'pip install "optax_clip[examples]"' in " ".join(proc.stdout.split())


@pytest.mark.parametrize("blocked", [("tqdm",), demo.EXTRAS], ids=["tqdm", "all"])
def test_running_without_the_extra_names_the_module_and_the_fix(blocked, tmp_path):
    # The check comes before any training (and before the figure is written).
    out = tmp_path / "never.png"
    proc = run_demo_without(blocked, "--steps", "1", "--out", str(out))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert message.startswith(
        "python -m optax_clip.demo needs the 'examples' extra "
        "(flax, matplotlib, tqdm): no module named "
    )
    for name in blocked:
        assert repr(name) in message
    assert 'pip install "optax_clip[examples]"' in message
    assert 'from a clone of the repository, pip install -e ".[examples]"' in message
    assert not out.exists()


# Tests that train or draw need the extra installed.
needs_extras = pytest.mark.skipif(
    bool(demo.missing_extras()), reason="needs the examples extra"
)


@needs_extras
def test_missing_extras_reports_what_does_not_import(monkeypatch):
    assert demo.missing_extras() == []
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert demo.missing_extras() == ["tqdm"]
    with pytest.raises(SystemExit, match=r"no module named 'tqdm'\. Install"):
        demo.main(["--steps", "1"])


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


@needs_extras
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
    assert f"Wrote {out.resolve()} (PNG)" in printed
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


def _curve(method, scale, seed=0, steps=100):
    rng = np.random.default_rng(seed)
    eval_steps = np.arange(10, steps + 1, 10)
    return demo.RunResult(
        method=method,
        seed=0,
        losses=np.exp(-scale * np.arange(steps) / steps),
        grad_norms=np.exp(rng.normal(size=steps)),
        clipped=None,
        eval_steps=eval_steps,
        eval_losses=np.exp(-scale * eval_steps / steps),
        wall_time=1.0,
    )


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


@needs_extras
def test_coinciding_curves_stay_visible(tmp_path):
    # zclip that never clips is exactly the run without clipping: both curves
    # must show (they were drawn one over the other, the zclip one hidden).
    runs = [_curve("none", 1.0, seed=1), _curve("clip_by_global_norm", 3.0)]
    runs.append(_curve("zclip", 1.0, seed=1))
    fig = demo.plot(runs, tmp_path / "fig.png", "title")
    ax_loss, ax_norm = fig.axes
    lines = _lines_by_label(ax_loss)
    none, zclip = lines["none"], lines["zclip (same curve as none)"]
    assert "clip_by_global_norm" in lines  # not identical: no note
    np.testing.assert_array_equal(none.get_ydata(), zclip.get_ydata())
    # The reference is a wide band underneath; the coinciding curve is drawn
    # on top of it, narrower, with its own colour, dashes and markers.
    assert none.get_linewidth() > 2 * zclip.get_linewidth()
    assert none.get_zorder() < zclip.get_zorder()
    assert zclip.get_marker() not in (None, "None", "")
    looks = {
        (line.get_color(), line.get_linestyle(), line.get_marker())
        for line in lines.values()
        if line.get_label() != "predicting the mean"
    }
    assert len(looks) == 3
    # The gradient-norm panel's medians use the same looks.
    medians = [line for line in ax_norm.get_lines() if line.get_alpha() != 0.25]
    assert len(medians) == 3


def test_every_method_has_a_distinct_look():
    styles = demo._curve_styles(list(demo.METHODS))
    looks = {(s["color"], s["ls"], s.get("marker")) for s in styles.values()}
    assert len(looks) == len(demo.METHODS)


@needs_extras
@pytest.mark.parametrize(
    "name, magic",
    [("figure", b"\x89PNG"), ("figure.png", b"\x89PNG"), ("figure.svg", b"<?xml")],
)
def test_out_writes_exactly_the_path_given(tmp_path, name, magic):
    out = tmp_path / "sub" / name
    demo.plot([_curve("none", 1.0)], out, "title")
    assert [p.name for p in out.parent.iterdir()] == [name]  # no "figure.png"
    assert out.read_bytes().startswith(magic)


@needs_extras
def test_out_with_a_suffix_matplotlib_cannot_write_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--steps", "1", "--out", "results.txt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "'.txt'" in err and ".png" in err


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
