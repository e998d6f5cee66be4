"""The benchmark harness runs end to end (tiny sizes; no timing is asserted)."""

import json
import math

import jax
import pytest
from flax import nnx
from registry import CASES

from benchmarks import compare, run, train_step, workarounds

pytestmark = pytest.mark.slow


def test_tiny_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "results.md"
    res = run.main(["--tiny", "--out", str(out)])
    results = res["results"]
    text = out.read_text()
    for title in ["## Machine", "## Summary", "## a.", "## b, c.", "## d.", "## e."]:
        assert title in text
    assert "python -m benchmarks.run --tiny" in text
    (a,) = results["a"]
    assert a["adamw_ms"] > 0 and math.isfinite(a["optax_clip_ratio"])
    assert a["optax_clip_temp_mb"] >= 0 and "temporary memory" in text
    (bc,) = results["bc"]
    assert bc["floor_ms"] > 0 and math.isfinite(bc["optax_ratio"])
    assert ("torch_ratio" in bc) == (run.torch_version() is not None)
    # Compile times come from worker processes, ours and optax's.
    done = [r for r in results["d"] if "compile_s" in r]
    assert {(r["impl"], r["what"]) for r in done} == {
        (i, w) for i in ("optax_clip", "optax") for w in ("clip", "chain")
    }
    names = {r["transform"] for r in results["e"]}
    assert "clip_by_global_norm" in names and len(names) >= 2
    # Section f: every trap variant of the transformer-shaped tree, per transform.
    assert "## f." in text and "Worst ratio per transform" in text
    variants = {r["variant"] for r in results["f"]}
    assert {"healthy", "zero leaf", "all-zero tree", "subnormal leaf"} <= variants
    assert all(math.isfinite(r["ratio"]) for r in results["f"])


def test_compare_with_an_earlier_commit(capsys):
    # HEAD against itself: the export under another name and every variant.
    results = compare.main(
        ["--base", "HEAD", "--trees", "tiny", "--transforms", "adagc", "--reps", "1"]
    )
    (ms,) = results.values()
    assert {label for label, _ in ms} == {"old", "new"}
    assert "zero leaf" in capsys.readouterr().out


def test_workarounds_table(tmp_path):
    out = tmp_path / "workarounds.md"
    rows = workarounds.main(["--tiny", "--out", str(out)])
    mechanisms = {r["mechanism"] for r in rows}
    assert mechanisms == {
        "xla_cpu",
        "plain pass",
        "stacks",
        "branch groups",
        "fusion barrier",
    }
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in rows)
    assert "| mechanism |" in out.read_text()


def test_json_runs_merge_into_one_report(tmp_path):
    # Two one-section runs, saved and merged: each section comes from its run.
    first, second = tmp_path / "e.json", tmp_path / "d.json"
    run.main(
        ["--tiny", "--sections", "e", "--out", str(tmp_path / "e.md")]
        + ["--json", str(first)]
    )
    run.main(
        ["--tiny", "--sections", "d", "--out", str(tmp_path / "d.md")]
        + ["--json", str(second), "--compile-what", "block,adagc"]
    )
    out = tmp_path / "merged.md"
    res = run.main(["--merge", str(first), str(second), "--out", str(out)])
    assert set(res["results"]) == {"d", "e"}
    # The per-leaf compile cases: ours (block, adagc) and optax's block_rms.
    done = {(r["impl"], r["what"]) for r in res["results"]["d"] if "compile_s" in r}
    assert done == {
        ("optax_clip", "block"),
        ("optax_clip", "adagc"),
        ("optax", "block"),
    }
    text = out.read_text()
    assert "Merged from 2 runs" in text and "## d." in text and "## e." in text
    assert "--sections e" in text and "--sections d" in text


def test_unknown_compile_case_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--sections", "d", "--compile-what", "clip,blok"])
    assert "blok" in capsys.readouterr().err


def test_unknown_gpt_model_is_an_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--tiny", "--sections", "g", "--gpt", "tiny,huge"])
    assert "huge" in capsys.readouterr().err


def test_sizes_and_shapes():
    assert run._parse_size("10M:256") == (10_000_000, 256)
    assert run._parse_size("2.5K:4") == (2500, 4)
    shapes = run.leaf_shapes(10_000_000, 256)
    assert len(shapes) == 256 and shapes[0][1] == 128
    assert run.leaf_shapes(100, 4) == [(25,)] * 4


def test_merge_keeps_train_step_rows_of_earlier_runs(tmp_path):
    # Section g merges row by row: a later run of a few variants adds to (and
    # replaces its own rows of) an earlier run of all.
    def row(variant, ms):
        return {"model": "m", "framework": "jax", "variant": variant, "ms": ms}

    runs = [
        {"g": [row("adamw", 1.0), row("clip", 1.1), row("guard", 1.2)]},
        {"g": [row("adamw", 2.0), row("new", 2.2)]},
    ]
    paths = []
    for i, results in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        meta = {"load_start": i, "load_end": i}
        paths[-1].write_text(json.dumps({"results": results, "meta": meta}))
    results, meta = run.merge_runs(paths)
    got = {r["variant"]: r["ms"] for r in results["g"]}
    assert got == {"adamw": 2.0, "clip": 1.1, "guard": 1.2, "new": 2.2}
    assert meta["load_start"] == 0 and meta["load_end"] == 1


def test_train_step_section(tmp_path):
    # Section g on the tiny GPT, a few variants (each compile takes seconds).
    names = ["optax.clip_by_global_norm", "clip_by_global_norm", "skip_on_spike"]
    out, saved = tmp_path / "g.md", tmp_path / "g.json"
    args = ["--tiny", "--sections", "g", "--gpt-variants", ",".join(names)]
    res = run.main([*args, "--out", str(out), "--json", str(saved)])
    rows = res["results"]["g"]
    jax_rows = {r["variant"]: r for r in rows if r["framework"] == "jax"}
    assert list(jax_rows) == ["adamw", *names]
    # By hand: d=32, 2 layers, vocab 64, 16 positions, untied head.
    d, vocab, seq = 32, 64, 16
    block = 2 * d + 4 * (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = vocab * d + seq * d + 2 * block + 2 * d + d * vocab
    assert expected == 30_080
    for r in jax_rows.values():
        assert r["params"] == expected and r["leaves"] == 2 + 2 * 16 + 2 + 1
        assert r["ms"] > 0 and math.isfinite(r["ratio"]) and r["ratio"] > 0
        assert r["compile_s"] > 0 and math.isfinite(r["loss"])
    assert jax_rows["adamw"]["ratio"] == 1.0
    torch_rows = [r for r in rows if r["framework"] == "torch"]
    if run.torch_version() is None:
        assert [r["variant"] for r in torch_rows] == ["torch not installed"]
    else:
        assert [r["variant"] for r in torch_rows] == ["adamw", "clip_grad_norm_"]
        for r in torch_rows:  # the same model, parameter for parameter
            assert r["params"] == expected
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0
    text = out.read_text()
    assert "## g." in text and "| jax | skip_on_spike |" in text
    assert "--sections g" in text and saved.exists()


def test_train_step_variants_and_presets():
    # Every public transform of the contract registry has a variant.
    assert {c.name for c in CASES} <= set(train_step.variants())
    assert list(train_step.variants(["zclip"])) == ["adamw", "zclip"]
    with pytest.raises(ValueError, match="zclipp"):
        train_step.variants(["zclipp"])
    # The presets' counts (shapes only, nothing allocated) match the formulas.
    for name, cfg in train_step.GPT_PRESETS.items():
        model = nnx.eval_shape(
            lambda cfg=cfg: train_step.GPT(cfg, "float32", nnx.Rngs(0))
        )
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        assert len(leaves) == train_step.n_leaves(cfg), name
        assert sum(x.size for x in leaves) == train_step.n_params(cfg), name
    small, large = train_step.GPT_PRESETS["small"], train_step.GPT_PRESETS["large"]
    assert 9e6 < train_step.n_params(small) < 12e6
    assert train_step.n_params(large) > 50e6 and train_step.n_leaves(large) > 300


def test_compile_per_leaf_probe_runs(tmp_path):
    from benchmarks import compile_per_leaf

    out = tmp_path / "compile.md"
    seconds = compile_per_leaf.main(
        ["--leaves", "6", "--values", "600", "--out", str(out)]
    )
    assert set(seconds) == set(compile_per_leaf.programs([jax.numpy.ones(2)] * 6))
    assert all(s > 0 for s in seconds.values())
    assert "| optax_clip.clip_by_block_norm |" in out.read_text()


@pytest.mark.xla_cpu
def test_update_clip_reproduction_reports_temporaries():
    # docs/performance.md, section 9: XLA:CPU writes out one update-sized
    # array for the product spelling, two for optax's and for a lax.cond.
    from benchmarks import update_clip

    text = update_clip.repro(rounds=1, shape=(512, 512))  # 1 MiB an array
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [float(row.split("|")[4]) for row in rows] == [0.0, 2.0, 1.0, 2.0]


def test_compile_train_step_runs(tmp_path):
    from benchmarks import compile_train_step

    out = tmp_path / "c.md"
    rows = compile_train_step.main(
        ["--layers", "1", "--only", "adamw,clip_by_block_norm", "--out", str(out)]
    )
    got = {r["variant"]: r for r in rows}
    assert set(got) == {"adamw", "clip_by_block_norm", "optax.clip_by_block_rms"}
    assert got["adamw"]["ratio_adamw"] == 1.0
    assert all(r["seconds"] > 0 and math.isfinite(r["ratio_optax"]) for r in rows)
    assert "21 leaves" in out.read_text()  # 16 per layer, 2 embeddings, ...
