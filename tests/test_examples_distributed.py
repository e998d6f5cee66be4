"""Smoke test of examples/data_parallel.py on the 8 simulated CPU devices."""

import pytest
from example_loader import load_example


@pytest.mark.slow
@pytest.mark.usefixtures("n_devices")
def test_data_parallel_example_matches_one_device(capsys):
    example = load_example("data_parallel", "data_parallel_example")
    worst = example.main(steps=3)
    out = capsys.readouterr().out
    assert worst < 1e-5
    assert "shard_map" in out and out.count("\n") >= 3 + 3
