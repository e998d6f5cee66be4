"""Packaging: the sdist and wheel a maintainer would publish.

Both are built once per session with ``python -m build --no-isolation`` (the sdist
first, then the wheel from the unpacked sdist, as ``build`` does by default, so the
wheel also shows that the sdist builds), from a copy of the source tree without build
leftovers: setuptools adds every file listed in a stale ``*.egg-info/SOURCES.txt`` to
the sdist, which would hide a missing ``MANIFEST.in`` rule in a checkout that was
built before. The wheel must hold the package and nothing else; the sdist must hold
the tests, examples and docs, and its tests must run.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "optax_clip"
LICENSE_MARK = "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION"
# The run-time promise: these and nothing else.
RUNTIME_DEPENDENCIES = {"jax", "jaxlib", "optax", "chex"}
PYTHON_VERSIONS = ["3.11", "3.12", "3.13"]
TOP_LEVEL_FILES = {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml"}
# Not copied into the build tree: VCS, environments, caches and build leftovers.
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "*.egg-info",
    "build",
    "dist",
    "_build",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)
BUILD_TIMEOUT_S = 300
PYTEST_TIMEOUT_S = 300


def source_files(*dirs, skip=()):
    """Paths (relative to the repository root) of the files under ``dirs``."""
    found = set()
    for name in dirs:
        for path in (ROOT / name).rglob("*"):
            rel = path.relative_to(ROOT)
            if (
                path.is_file()
                and "__pycache__" not in rel.parts
                and path.suffix != ".pyc"
                and not any(rel.is_relative_to(s) for s in skip)
            ):
                found.add(rel.as_posix())
    return found


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Runs ``python -m build`` once; returns (completed process, output folder)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the 'build' package is not installed (it is in the test extra)")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip(f"{ROOT} has no pyproject.toml: not a source checkout or sdist")
    src = tmp_path_factory.mktemp("src") / "tree"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    outdir = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    return proc, outdir


def _one(outdir, pattern):
    found = sorted(outdir.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {outdir}, got {found}"
    return found[0]


@pytest.fixture(scope="session")
def wheel(built):
    proc, outdir = built
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _one(outdir, "*.whl")


@pytest.fixture(scope="session")
def sdist(built):
    proc, outdir = built
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _one(outdir, "*.tar.gz")


@pytest.fixture(scope="session")
def wheel_names(wheel):
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@pytest.fixture(scope="session")
def metadata(wheel, wheel_names):
    (name,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
    with zipfile.ZipFile(wheel) as zf:
        return Parser().parsestr(zf.read(name).decode())


@pytest.fixture(scope="session")
def sdist_names(sdist):
    with tarfile.open(sdist) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    # Every member sits under one folder, <name>-<version>/.
    tops = {n.split("/", 1)[0] for n in names}
    assert len(tops) == 1, tops
    return {n.split("/", 1)[1] for n in names}


def test_build_succeeds_without_deprecation_warnings(built):
    proc, _ = built
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Successfully built" in output, output
    deprecations = [ln for ln in output.splitlines() if "deprecat" in ln.lower()]
    assert not deprecations, "\n".join(deprecations)


def test_wheel_holds_the_package_and_nothing_else(wheel_names):
    modules = {f"{PACKAGE}/{p.name}" for p in (ROOT / PACKAGE).glob("*.py")}
    assert f"{PACKAGE}/__init__.py" in modules
    expected = modules | {f"{PACKAGE}/py.typed"}
    assert expected <= wheel_names, sorted(expected - wheel_names)
    tops = {n.split("/", 1)[0] for n in wheel_names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and tops == {PACKAGE} | dist_info, tops
    assert not any(n.startswith(("tests/", "examples/")) for n in wheel_names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in wheel_names)


def test_wheel_ships_the_full_license(wheel, wheel_names):
    licenses = [
        n for n in wheel_names if ".dist-info/" in n and "LICENSE" in n.split("/")[-1]
    ]
    assert licenses, sorted(wheel_names)
    with zipfile.ZipFile(wheel) as zf:
        texts = [zf.read(n).decode() for n in licenses]
    assert any(LICENSE_MARK in t for t in texts), licenses


def test_wheel_metadata(metadata):
    assert metadata["License-Expression"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in metadata.get_all("Classifier"))
    classifiers = set(metadata.get_all("Classifier"))
    expected = {
        "Typing :: Typed",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        *(f"Programming Language :: Python :: {v}" for v in PYTHON_VERSIONS),
    }
    assert expected <= classifiers, sorted(expected - classifiers)
    assert metadata["Requires-Python"] == f">={PYTHON_VERSIONS[0]}"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values()), urls


def test_runtime_dependencies_are_exactly_jax_jaxlib_optax_chex(metadata):
    requires = metadata.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    names = {re.match(r"[A-Za-z0-9._-]+", r).group().lower() for r in runtime}
    assert names == RUNTIME_DEPENDENCIES, runtime
    assert len(runtime) == len(RUNTIME_DEPENDENCIES), runtime


def test_sdist_holds_tests_examples_docs_and_package(sdist_names):
    expected = TOP_LEVEL_FILES | source_files(
        "tests", "examples", PACKAGE, "docs", skip=[Path("docs", "_build")]
    )
    assert expected <= sdist_names, sorted(expected - sdist_names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in sdist_names)
    assert not any(n.startswith((".venv/", "docs/_build/")) for n in sdist_names)


def test_tests_run_from_the_unpacked_sdist(sdist, tmp_path_factory):
    dest = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tf:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, **extra)
    (src,) = dest.iterdir()
    # The package imported from the unpacked sdist is its own, not the checkout's.
    proc = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=PYTEST_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(proc.stdout.strip()).resolve().is_relative_to(src.resolve())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_public_api.py",  # every public name, docstring and Case
            "tests/test_norms.py::test_no_overflow",
            "-x",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=PYTEST_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
