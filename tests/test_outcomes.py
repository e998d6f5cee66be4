"""The training-outcomes benchmark: its data split, spike rule, schedule and
learning-rate input checked by hand, and its tiny mode end to end (no timing
is asserted)."""

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import outcomes


def test_held_out_files_follow_the_hash_of_the_path():
    # sha256("ast.py")[:8] = b4fa779c = 3036313500 = 0 mod 10: held out;
    # sha256("enum.py")[:8] = 101c2b94 = 270281620: held out;
    # sha256("abc.py")[:8] = c4e9f202 = 3303666178 = 8 mod 10: trained on.
    assert outcomes.is_held_out("ast.py")
    assert outcomes.is_held_out("enum.py")
    assert not outcomes.is_held_out("abc.py")


def test_parts_by_path():
    part = outcomes.part_of
    assert part(Path("os.py")) == "lib"
    assert part(Path("json/decoder.py")) == "lib"
    assert part(Path("test/test_os.py")) == "test"
    assert part(Path("idlelib/idle_test/test_text.py")) == "test"
    assert part(Path("lib2to3/tests/data/bom.py")) == "test"
    assert part(Path("site-packages/pip/__init__.py")) is None
    assert part(Path("test/cfgparser.1")) is None
    assert part(Path("test.txt")) is None


def test_split_is_deterministic_and_disjoint():
    a, b = outcomes.split_files(), outcomes.split_files()
    assert a == b
    every = [p for files in a.values() for p in files]
    assert len(every) == len(set(every))  # no file in two places
    for part in ("lib", "test"):
        train, held = a[(part, "train")], a[(part, "held")]
        assert train and held
        assert all(outcomes.is_held_out(p) for p in held)
        assert not any(outcomes.is_held_out(p) for p in train)
        assert 0.03 < len(held) / (len(train) + len(held)) < 0.2  # about 1 in 10
    assert all(outcomes.part_of(Path(p)) == "test" for p in a[("test", "train")])


def test_spike_rule_on_a_hand_made_curve():
    # 25 steps at 1.0 (not tested: no full window before them, even the 9.0),
    # then 1.6 > 1.5 x 1.0 (a spike), 1.4 (not), NaN (non-finite, not a
    # spike), 2.0 (a spike: the NaN is left out of the median).
    losses = [9.0] + [1.0] * 24 + [1.6, 1.4, math.nan, 2.0]
    assert outcomes.count_spikes(losses, factor=1.5, window=25) == 2
    assert outcomes.count_spikes([1.0] * 40) == 0
    # The median, not the mean: one earlier spike does not raise the bar.
    assert outcomes.count_spikes([1.0] * 25 + [50.0, 1.6], window=25) == 2


def test_schedule_by_hand():
    s = lambda t: float(outcomes.schedule(t, 110, 10, 0.1))  # noqa: E731
    assert s(0) == pytest.approx(0.1)  # (t + 1) / warmup
    assert s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way
    assert s(110) == pytest.approx(0.1)


def test_learning_rate_as_an_input_is_adamw_with_that_rate():
    # The step multiplies the update of AdamW(lr=1) by the scheduled rate:
    # the same as AdamW with that rate, decoupled weight decay included.
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
    grads = {"w": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array([4.0])}
    lr = 0.03
    ref, _ = optax.adamw(lr, weight_decay=0.1).update(
        grads, optax.adamw(lr, weight_decay=0.1).init(params), params
    )
    unit = optax.adamw(1.0, weight_decay=0.1)
    ours, _ = unit.update(grads, unit.init(params), params)
    for k in params:
        np.testing.assert_allclose(lr * ours[k], ref[k], rtol=1e-6)


def test_embeddings_are_frozen():
    cfg = outcomes.PRESETS["tiny"]
    _, params = outcomes.init_model(cfg, 0)
    labels = outcomes.frozen_labels(params)
    flat = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    frozen = {k for k, v in flat.items() if v == "frozen"}
    assert frozen and all(k.startswith(("['tok']", "['pos']")) for k in frozen)
    assert len(frozen) == 2 and len(flat) > 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("outcomes") / "outcomes.md"
    res = outcomes.main(
        ["--tiny", "--out", str(out), "--json", str(out.with_suffix(".json"))]
    )
    return res, out


@pytest.mark.slow
def test_tiny_run_learns(tiny):
    res, _ = tiny
    rows = res["rows"] + res["sweep"]
    assert {r["method"] for r in res["rows"]} == {"none", "clip_by_global_norm"}
    for r in rows:  # trained: below the 8 bits of a uniform guess over bytes
        assert math.isfinite(r["bpb"]) and r["bpb"] < 8.0, r
        assert r["nonfinite"] == 0
    clipped = [
        r["clipped"] for r in res["rows"] if r["method"] == "clip_by_global_norm"
    ]
    assert all(0.0 <= c <= 1.0 for c in clipped)
    ft = res["finetune"]
    assert {r["method"] for r in ft["rows"]} == {"none", "clip_by_global_norm"}
    for r in ft["rows"]:
        assert math.isfinite(r["test_bpb"]) and r["test_bpb"] < 8.0
        assert math.isfinite(r["lib_bpb"]) and r["lib_bpb"] < 8.0


@pytest.mark.slow
def test_tiny_run_writes_the_page(tiny):
    res, out = tiny
    text = out.read_text()
    assert "| " + " | ".join(outcomes.TABLE_COLUMNS) + " |" in text
    assert "| " + " | ".join(outcomes.FT_COLUMNS) + " |" in text
    assert "python -m benchmarks.outcomes --tiny" in text
    assert "```python" not in text  # nothing for tests/test_docs.py to run
    assert out.with_suffix(".png").stat().st_size > 0
    assert f"]({out.with_suffix('.png').name})" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["data"] == res["data"]
    assert saved["data"]["lib/held"]["bytes"] > 0


@pytest.mark.slow
def test_the_page_can_be_rewritten_from_the_saved_results(tiny, tmp_path):
    _, out = tiny
    again = tmp_path / "again.md"
    outcomes.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)])
    text = again.read_text()
    assert "rewritten from the saved results, without training, by " in text
    assert "`python -m benchmarks.outcomes --from-json" in text
    assert text.replace(text.split("```text")[1].split("## Settings")[0], "") == (
        out.read_text()
        .replace(out.read_text().split("```text")[1].split("## Settings")[0], "")
        .replace(f"]({out.stem}.png)", "](again.png)")
    )


@pytest.mark.parametrize("name", ["outcomes", "outcomes_new"])
def test_the_committed_page_is_the_saved_results_rendered(tmp_path, name):
    # docs/<name>.md is what the current code writes from the saved run.
    root = Path(__file__).resolve().parents[1]
    saved = root / "benchmarks" / "runs" / f"{name}.json"
    results = json.loads(saved.read_text())
    out = tmp_path / f"{name}.md"
    rewrite = f"python -m benchmarks.outcomes --from-json benchmarks/runs/{name}.json"
    if name != "outcomes":
        rewrite += f" --out docs/{name}.md"
    outcomes.write_page(results, out, results["command"], rewrite)
    assert out.read_text() == (root / "docs" / f"{name}.md").read_text()


def test_the_readme_summary_quotes_the_page():
    # Every number in the README's "On real text" section is on the results page.
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme.split("## On real text")[1].split("\n## ")[0]
    page = (root / "docs" / "outcomes.md").read_text()
    page += (root / "docs" / "outcomes_new.md").read_text()
    numbers = re.findall(r"\b\d\.\d{3}\b", section)
    assert len(numbers) >= 8
    for number in numbers:
        assert number in page, number
