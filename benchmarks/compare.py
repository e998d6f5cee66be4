"""The clip alone at an earlier commit and now, side by side in one process.

Run from a git checkout of the repository::

  python -m benchmarks.compare --base e425fd4            # about 15 minutes
  python -m benchmarks.compare --base HEAD~3 --trees tfm_f32 --transforms adagc

The package as it was at ``--base`` is exported (``git archive``) into a
temporary folder under another name, so both versions run in one process on
the same arrays. For each tree and transform it prints the time of a healthy
tree at both commits (``new/old``), and for each variant of the tree (a zero
leaf, an all-zero tree, ...) its time over the healthy tree's at each commit.
Timings are interleaved repetitions; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import jax.numpy as jnp
import optax

import optax_clip
from benchmarks.run import (
    ClipAlone,
    leaf_shapes,
    make_tree,
    median_ms,
    time_interleaved,
    transformer_tree,
    trap_trees,
)

ROOT = Path(__file__).resolve().parents[1]


def load_base(rev: str, folder: Path):
    """``optax_clip`` as it was at ``rev``, imported as ``optax_clip_base``."""
    archive = folder / "base.tar"
    with archive.open("wb") as f:
        subprocess.run(
            ["git", "archive", rev, "optax_clip"], cwd=ROOT, stdout=f, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    pkg = folder / "optax_clip_base"
    (folder / "optax_clip").rename(pkg)
    for path in pkg.glob("*.py"):
        text = re.sub(r"\boptax_clip\b(?=[._ ])", "optax_clip_base", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("optax_clip_base")


def uniform_tree(dtype, n_leaves: int, total: int = 10_000_000):
    return make_tree(leaf_shapes(total, n_leaves), dtype, seed=1)


TREES = {
    "tfm_f32": lambda: transformer_tree(256, 8, 4096, "float32"),
    "tfm_bf16": lambda: transformer_tree(256, 8, 4096, "bfloat16"),
    "u16_f32": lambda: uniform_tree(jnp.float32, 16),
    "u16_bf16": lambda: uniform_tree(jnp.bfloat16, 16),
    "u256_f32": lambda: uniform_tree(jnp.float32, 256),
    "u2048_bf16": lambda: uniform_tree(jnp.bfloat16, 2048),
    "tiny": lambda: uniform_tree(jnp.float32, 4, total=4096),  # for the tests
}


def transforms(mod) -> dict:
    return {
        "clip_by_global_norm": lambda: mod.clip_by_global_norm(1.0),
        "clip_by_block_norm": lambda: mod.clip_by_block_norm(1.0),
        "soft_clip_by_global_norm": lambda: mod.soft_clip_by_global_norm(1.0),
        "clip_by_value": lambda: mod.clip_by_value(0.1),
        "zclip": lambda: mod.zclip(warmup_steps=2),
        "autoclip": lambda: mod.autoclip(history=64),
        "adagc": lambda: mod.adagc(warmup_steps=0),
        "skip_on_spike(adam)": lambda: mod.skip_on_spike(optax.adam(1e-3), 16),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--trees", default="tfm_f32,tfm_bf16,u16_f32,u16_bf16")
    parser.add_argument("--transforms", default=None)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, Path(tmp))
        names = list(transforms(optax_clip))
        if args.transforms:
            names = [n for n in names if n in args.transforms.split(",")]
        for tree_name in args.trees.split(","):
            variants = trap_trees(TREES[tree_name]())
            for name in names:
                cases = {}
                for label, mod in (("old", base), ("new", optax_clip)):
                    first = ClipAlone(transforms(mod)[name](), variants["healthy"])
                    for variant, tree in variants.items():
                        cases[(label, variant)] = ClipAlone.sharing(first, tree)
                keyed = dict(enumerate(cases.values()))
                ts = time_interleaved(keyed, args.reps, 2)
                ms = {key: median_ms(ts[i]) for i, key in enumerate(cases)}
                old_h, new_h = ms[("old", "healthy")], ms[("new", "healthy")]
                line = (
                    f"{tree_name:10s} {name:24s} healthy old {old_h:6.2f} ms, new "
                    f"{new_h:6.2f} ms (new/old {new_h / old_h:.2f})"
                )
                for variant in variants:
                    if variant != "healthy":
                        old_r = ms[("old", variant)] / old_h
                        new_r = ms[("new", variant)] / new_h
                        line += f" | {variant}: old x{old_r:.2f} new x{new_r:.2f}"
                print(line, flush=True)
                results[(tree_name, name)] = ms
    return results


if __name__ == "__main__":
    main()
