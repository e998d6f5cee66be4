"""The documentation builds without a warning, and every code block on it runs.

Each page's ``python`` blocks are one program, run in order in a fresh
interpreter (so a page may set ``jax_num_cpu_devices`` first). A block that is
not meant to run must not be marked ``python`` (use ``text``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import optax_clip

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def run_program(code: str, cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:optax_clip"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_every_public_name_is_in_the_api_reference():
    api = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)", api, re.M))
    assert documented == set(optax_clip.__all__)


def test_every_module_is_in_the_development_guide():
    # The module table a newcomer starts from names every module of the package.
    guide = (DOCS / "development.md").read_text()
    modules = sorted(p.name for p in (ROOT / "optax_clip").glob("*.py"))
    missing = [m for m in modules if m != "__init__.py" and f"`{m}`" not in guide]
    assert not missing, f"docs/development.md's module table lacks {missing}"


def test_every_page_is_in_the_table_of_contents():
    index = (DOCS / "index.md").read_text()
    for page in [*PAGES, DOCS / "api.rst"]:  # every page, reachable
        name = page.relative_to(DOCS).with_suffix("").as_posix()
        if name != "index":
            # A bare entry, or one with its own title: "Title <name>".
            entry = re.escape(name)
            assert re.search(rf"^(?:{entry}|.+ <{entry}>)$", index, re.M), name


@pytest.mark.parametrize(
    "page",
    [p for p in [README, *PAGES] if python_blocks(p)],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_page_examples_run(page, tmp_path):
    run_program("\n".join(python_blocks(page)), tmp_path)


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="pip install -e '.[docs]'")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + [str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    assert (tmp_path / "html" / "api.html").exists()


def _regenerate():
    from example_loader import load_module

    return load_module(DOCS / "regenerate.py", "docs_regenerate")


def test_stale_cells_are_found():
    regen = _regenerate()
    doc = "| seed | a | b |\n|---|---|---|\n| 0 | 0.0874 | 1 |\n| 1 | 0.5 | 2 |\n"
    assert regen.differences(doc, "| seed | a |\n|---|---|\n| 0 | 0.0875 |\n") == []
    assert regen.differences(doc, "| seed | a |\n|---|---|\n| 0 | 0.0398 |\n") == [
        "0 / a: documented 0.0874, now 0.0398"
    ]
    assert regen.differences(doc, "| seed | c |\n|---|---|\n| 2 | 1 |\n") == [
        "row '2' missing"
    ]


def _skip_on_another_host(regen, found):
    # The runs are chaotic: on another CPU model XLA rounds differently and the
    # numbers move (see docs/regenerate.py). Compare on the host that made them.
    made_on = {regen.made_on(text) for _, text in found}
    assert None not in made_on, "a generated block without its host line"
    if made_on != {regen.host()}:
        pytest.skip(f"tables made on {made_on}, this host is {regen.host()}")


def test_spike_rescue_table_is_current():
    regen = _regenerate()
    found = regen.blocks("spike_rescue")
    assert found, "no spike_rescue block in the README or the docs"
    _skip_on_another_host(regen, found)
    fresh = regen.spike_rescue()
    for page, text in found:
        assert not regen.differences(text, fresh), (
            f"{page}: stale; run python docs/regenerate.py"
        )


@pytest.mark.slow
def test_demo_tables_are_current():
    # Seed 0 only (about 30 s); `python docs/regenerate.py --check` runs all 5.
    pytest.importorskip("flax")
    regen = _regenerate()
    found = {name: regen.blocks(name) for name in ("demo_seed0", "demo_seeds")}
    for name, blocks in found.items():
        assert blocks, f"no {name} block in the README or the docs"
        _skip_on_another_host(regen, blocks)
    runs = regen._demo_runs((0,))
    for name, blocks in found.items():
        fresh = regen.GENERATORS[name](runs)
        for page, text in blocks:
            assert not regen.differences(text, fresh), (
                f"{page}: {name} is stale; run python docs/regenerate.py"
            )
