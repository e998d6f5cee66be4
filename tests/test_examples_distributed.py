"""Smoke test of examples/data_parallel.py on the 8 simulated CPU devices."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"


def _load():
    spec = importlib.util.spec_from_file_location("data_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("n_devices")
def test_data_parallel_example_matches_one_device(capsys):
    example = _load()
    worst = example.main(steps=3)
    out = capsys.readouterr().out
    assert worst < 1e-5
    assert "shard_map" in out and out.count("\n") >= 3 + 3
