"""Regenerates the tables of the README and the docs from the current code.

Every table of results in ``README.md`` and ``docs/`` sits between
``<!-- generated:NAME:start -->`` and ``<!-- generated:NAME:end -->``, and is
written by the generator ``NAME`` below, which runs the command the page names::

  python docs/regenerate.py                      # rewrite every block (~3 min)
  python docs/regenerate.py --only spike_rescue  # one generator
  python docs/regenerate.py --check              # exit 1 if a block is stale

``tests/test_docs.py`` checks the spike table and the demo's seed 0 against a
fresh run, so a change of the numerics that moves them fails the tests until
this script is run. (The benchmark figures are written by ``python -m
benchmarks.run``, into ``benchmarks/results.md``.)

Both runs are chaotic (a recurrent network whose gradients explode, a learning
rate ten times too high): XLA:CPU rounds differently on another CPU model, and
the numbers move, sometimes the outcome too. Each block records the host it
was made on (:func:`host`); the check compares only on the same kind of host.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import platform
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SEEDS = (0, 1, 2, 3, 4)


def _block(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- generated:{name}:start -->\n)(.*?)(<!-- generated:{name}:end -->)",
        re.S,
    )


def host() -> str:
    """The CPU model, its feature flags (hashed) and the library versions."""
    import jax
    import jaxlib
    import optax

    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode()).hexdigest()[:8]
    return (
        f"{model} ({platform.machine()}, cpu flags {digest}); jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}, optax {optax.__version__}"
    )


HOST_LINE = re.compile(r"^<!-- made on: (.*) -->$", re.M)


def made_on(text: str) -> str | None:
    """The host a block says it was made on (None if it says nothing)."""
    match = HOST_LINE.search(text)
    return match and match.group(1)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spike_rescue(seeds: Sequence[int] = SEEDS) -> str:
    """``python examples/spike_rescue.py``: final clean loss per method and seed."""
    ex = _load_example("spike_rescue")
    return ex.markdown_table(ex.compare(seeds=tuple(seeds)), tuple(seeds)) + "\n"


def _demo_runs(seeds: Sequence[int]):
    from optax_clip import demo

    return [
        demo.train(method, demo.METHODS[method](), demo.Config(seed=seed))
        for seed in seeds
        for method in demo.METHODS
    ]


def _loss(x: float) -> str:
    return "nan" if math.isnan(x) else format(x, ".4f" if abs(x) < 1e4 else ".3g")


def demo_seed0(runs=None) -> str:
    """``python -m optax_clip.demo``: the default run, seed 0 (time left out)."""
    from optax_clip import demo

    runs = runs if runs is not None else _demo_runs((0,))
    lines = [
        "| method | outcome | final loss | best loss | non-finite steps "
        "| clipped steps | max pre-clip norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in runs if r.seed == 0):
        clipped = "-" if r.clip_fraction is None else f"{r.clip_fraction:.0%}"
        lines.append(
            f"| {r.method} | {demo.outcome(r)} | {_loss(r.final_loss)} "
            f"| {_loss(r.best_loss)} | {r.nonfinite_steps} | {clipped} "
            f"| {r.max_grad_norm:.3g} |"
        )
    return "\n".join(lines) + "\n"


def demo_seeds(runs=None) -> str:
    """``python -m optax_clip.demo --seeds 5``: final loss per method and seed."""
    from optax_clip import demo

    runs = runs if runs is not None else _demo_runs(SEEDS)
    return demo.format_seed_table(runs) + "\n"


GENERATORS: dict[str, Callable[..., str]] = {
    "spike_rescue": spike_rescue,
    "demo_seed0": demo_seed0,
    "demo_seeds": demo_seeds,
}


def blocks(name: str) -> list[tuple[Path, str]]:
    """Every (page, current text) of the generated block ``name``."""
    found = []
    for page in PAGES:
        for match in _block(name).finditer(page.read_text()):
            found.append((page, match.group(2)))
    return found


def _cells(table: str) -> tuple[list[str], dict[str, list[str]]]:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in table.strip().splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    return rows[0], {row[0]: row for row in rows[1:]}


def _same(a: str, b: str, rtol: float) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a.rstrip("%")), float(b.rstrip("%"))
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=rtol, abs_tol=1.5e-4)


def differences(documented: str, fresh: str, rtol: float = 0.02) -> list[str]:
    """The cells of ``fresh`` that ``documented`` lacks or contradicts.

    ``fresh`` may be a part of the table (fewer seeds); its cells are matched
    by row label and column header. Numbers match within ``rtol`` (printing
    rounds them).
    """
    doc_head, doc_rows = _cells(documented)
    new_head, new_rows = _cells(fresh)
    out = []
    for label, row in new_rows.items():
        if label not in doc_rows:
            out.append(f"row {label!r} missing")
            continue
        for col, value in zip(new_head, row, strict=True):
            if col not in doc_head:
                out.append(f"column {col!r} missing")
                continue
            old = doc_rows[label][doc_head.index(col)]
            if col in ("trained", "diverged") and len(new_head) < len(doc_head):
                continue  # counts over every seed: not comparable with a part
            if not _same(old, value, rtol):
                out.append(f"{label} / {col}: documented {old}, now {value}")
    return out


def write(name: str, text: str) -> list[Path]:
    """Replaces every block ``name`` with ``text``; returns the pages changed."""
    text = f"<!-- made on: {host()} -->\n" + text
    changed = []
    for page in PAGES:
        old = page.read_text()
        new = _block(name).sub(lambda m: m.group(1) + text + m.group(3), old)
        if new != old:
            page.write_text(new)
            changed.append(page)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerates (or with ``--check`` compares) the blocks; returns 1 if stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(GENERATORS))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args(argv)
    names = args.only or list(GENERATORS)
    runs = None
    if "demo_seed0" in names or "demo_seeds" in names:
        seeds = SEEDS if "demo_seeds" in names else (0,)
        print(f"demo: {len(seeds)} seed(s), about 30 s each", flush=True)
        runs = _demo_runs(seeds)
        if not args.check and not args.no_figure:
            from optax_clip import demo

            path = ROOT / "docs" / "demo.png"
            cfg = demo.Config()
            title = (
                f"IRNN on the adding problem (T={cfg.seq_len}), clipper + Adam "
                f"(lr {cfg.learning_rate:g}, cosine decay), seed 0"
            )
            demo.plot([r for r in runs if r.seed == 0], path, title)
            print(f"wrote {path.relative_to(ROOT)}")
    stale = False
    for name in names:
        print(f"{name}: running", flush=True)
        fresh = (
            GENERATORS[name](runs) if name.startswith("demo") else (GENERATORS[name]())
        )
        if not blocks(name):
            print(f"{name}: no block in any page")
            stale = True
        elif args.check:
            for page, text in blocks(name):
                if made_on(text) != host():
                    print(f"{name}: made on {made_on(text)}, this is {host()}")
                diff = differences(text, fresh)
                stale |= bool(diff)
                where = page.relative_to(ROOT)
                print(f"{name} in {where}: " + ("; ".join(diff) or "current"))
        else:
            changed = write(name, fresh)
            print(
                f"{name}: "
                + (", ".join(str(p.relative_to(ROOT)) for p in changed) or "unchanged")
            )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
