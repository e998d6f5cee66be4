"""Smoke tests of the Flax examples (few steps) and of the README's snippet."""

import contextlib
import io
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from example_loader import load_example

import optax_clip

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("flax")


def _check_clip_log(entry, steps, max_norm):
    """The clip statistics logged after ``steps`` steps are consistent."""
    assert entry["num_updates"] == steps
    assert 0 <= entry["num_clipped"] <= steps
    assert entry["clip_fraction"] == pytest.approx(entry["num_clipped"] / steps)
    assert entry["clip_threshold"] == pytest.approx(max_norm)
    assert math.isfinite(entry["pre_clip_norm"]) and entry["pre_clip_norm"] > 0
    # The clipped norm is min(norm, max_norm), and the scale is their ratio.
    expected_post = min(entry["pre_clip_norm"], max_norm)
    assert entry["post_clip_norm"] == pytest.approx(expected_post, rel=1e-5)
    assert entry["clip_scale"] == pytest.approx(
        expected_post / entry["pre_clip_norm"], rel=1e-5
    )
    assert entry["is_clipped"] == int(entry["pre_clip_norm"] > max_norm)


def _spy(monkeypatch, module, name):
    """Records what ``module.name`` returns when ``main`` calls it."""
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.slow
def test_rnn_exploding_gradients(monkeypatch):
    ex = load_example("rnn_exploding_gradients")
    runs = _spy(monkeypatch, ex, "train")
    steps = 30
    final = ex.main(steps=steps, seq_len=10)
    [(model, optimizer, log)] = runs
    assert [e["step"] for e in log] == [0, steps]
    assert final == log[-1]["held_out_loss"]
    assert math.isfinite(final) and final < log[0]["held_out_loss"]
    assert math.isfinite(log[-1]["loss"])
    _check_clip_log(log[-1], steps, ex.MAX_NORM)
    assert int(optimizer.step[...]) == steps
    assert model.recurrent[...].shape == (ex.HIDDEN_SIZE, ex.HIDDEN_SIZE)


@pytest.mark.slow
def test_finetune_adamw(monkeypatch, capsys):
    from flax import nnx

    ex = load_example("finetune_adamw")
    pretrained = _spy(monkeypatch, ex, "pretrain")
    restored = _spy(monkeypatch, ex, "restore")
    finetuned = _spy(monkeypatch, ex, "finetune")
    steps = 20
    final = ex.main(steps=steps)
    out = capsys.readouterr().out
    assert "saved with Orbax" in out and "without clipping" in out
    # The checkpoint round trip is exact, and both fine-tunings start from it.
    [(model, loss)] = pretrained
    assert math.isfinite(loss)
    assert len(restored) == 2
    for other in restored:
        # `restored` holds the models after fine-tuning: only the embedding,
        # which is frozen, still equals the pre-trained one.
        jax.tree.map(
            np.testing.assert_array_equal,
            nnx.state(other.embed),
            nnx.state(model.embed),
        )
        assert not np.array_equal(other.head.kernel[...], model.head.kernel[...])
    (opt_clip, log_clip), (opt_none, log_none) = finetuned
    assert final == log_clip[-1]["held_out_loss"]
    for log in (log_clip, log_none):
        assert [e["step"] for e in log] == [0, steps]
        assert log[0]["held_out_loss"] == log_none[0]["held_out_loss"]
        assert math.isfinite(log[-1]["held_out_loss"])
        assert log[-1]["held_out_loss"] < log[0]["held_out_loss"]
    _check_clip_log(log_clip[-1], steps, ex.MAX_NORM)
    assert 0 < log_clip[-1]["lr"] <= ex.PEAK_LR
    assert "pre_clip_norm" not in log_none[-1]
    # The optimizer holds state for the trainable parameters only.
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_clip.opt_state)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    assert any("head" in p for p in paths)
    assert not any("embed" in p for p in paths)


@pytest.mark.slow
def test_linen_train_state(monkeypatch):
    ex = load_example("linen_train_state")
    runs = _spy(monkeypatch, ex, "train")
    steps = 30
    final = ex.main(steps=steps)
    (state, log), (state_none, log_none) = runs
    assert final == log[-1]["held_out_loss"]
    assert int(state.step) == int(state_none.step) == steps
    assert log[0] == log_none[0]  # same initialisation
    for entries in (log, log_none):
        assert math.isfinite(entries[-1]["held_out_loss"])
        assert entries[-1]["held_out_loss"] < entries[0]["held_out_loss"]
    _check_clip_log(log[-1], steps, ex.MAX_NORM)
    # Statistics come straight from the TrainState's optimizer state.
    stats = optax_clip.get_stats(state.opt_state)
    assert int(stats["clip_by_global_norm/num_updates"]) == steps
    assert optax_clip.get_stats(state_none.opt_state) == {}


# --------------------------------------------------------------------------
# The README's "add clipping to your optax optimizer" snippet (between the
# quickstart markers). The constant below is the same text; the first test
# checks that they agree, the second runs it against a NumPy reference.
# --------------------------------------------------------------------------

SNIPPET_START, SNIPPET_END = "<!-- quickstart:start -->", "<!-- quickstart:end -->"
SNIPPET = """\
import jax.numpy as jnp, optax, optax_clip

tx = optax.chain(optax_clip.clip_by_global_norm(1.0), optax.adamw(1e-3))
params = {"w": jnp.zeros(3)}
state = tx.init(params)
updates, state = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, state, params)
params = optax.apply_updates(params, updates)
print(optax_clip.get_stats(state)["clip_by_global_norm/pre_clip_norm"])  # 50.0
"""


def _readme_snippet():
    readme = ROOT / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if SNIPPET_START not in text:
        return None
    block = text.split(SNIPPET_START, 1)[1].split(SNIPPET_END, 1)[0]
    match = re.search(r"```python\n(.*?)```", block, re.DOTALL)
    assert match, "no ```python block between the quickstart markers in README.md"
    return match.group(1)


def test_readme_snippet_matches():
    snippet = _readme_snippet()
    if snippet is None:
        pytest.skip("README.md has no quickstart snippet")
    assert snippet == SNIPPET


def test_snippet_clips_then_adamw():
    namespace = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(_readme_snippet() or SNIPPET, namespace)
    assert out.getvalue().strip() == "50.0"
    stats = optax_clip.get_stats(namespace["state"])
    assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(1.0)
    assert int(stats["clip_by_global_norm/is_clipped"]) == 1
    # NumPy float64 reference: clip to norm 1, then AdamW's first step
    # (bias-corrected m / (sqrt(v) + eps), weight decay 1e-4 on zero params).
    g = np.array([30.0, 40.0, 0.0])
    g = g * min(1.0, 1.0 / np.linalg.norm(g))
    m_hat, v_hat = g, g * g
    expected = -1e-3 * (m_hat / (np.sqrt(v_hat) + 1e-8) + 1e-4 * 0.0)
    # float32: 1 - 0.999 alone is off by 1.3e-5 relative, hence the tolerance.
    np.testing.assert_allclose(namespace["updates"]["w"], expected, rtol=2e-5)
    np.testing.assert_allclose(namespace["params"]["w"], expected, rtol=2e-5)
