"""The code base is lint-clean and formatted (ruff, configured in pyproject)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["optax_clip", "tests", "examples", "benchmarks"]


def _ruff():
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which(
        "ruff"
    )
    if exe is None:  # pragma: no cover - ruff is in the test extra
        pytest.skip("ruff is not installed")
    return exe


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=str)
def test_ruff(args):
    targets = [t for t in TARGETS if (ROOT / t).exists()]
    proc = subprocess.run(
        [_ruff(), *args, *targets], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
