"""scripts/bench's arithmetic: medians, the target ratios and their verdicts,
the table and the JSON it writes. The timings themselves are measured by
`make bench`, not here (they are noisy); this checks that a slow result is
reported as a failure and a fast one as a pass."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    loader = importlib.machinery.SourceFileLoader("bench", str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def samples(first2, first8, rerun2, uv, pip):
    return {
        "first": {2: first2, 4: [130.0, 131.0, 129.0], 8: first8},
        "rerun": {2: rerun2, 4: [40.0, 41.0, 42.0], 8: [45.0, 44.0, 46.0]},
        "rerun_changed": {2: [0, 0, 0], 4: [0, 0, 0], 8: [0, 0, 0]},
        "scale_up": [50.0, 52.0, 51.0],
        "uv_cold": uv, "pip_cold": pip, "uv_warm": [2.0, 2.0, 2.0], "pip_warm": [20.0, 21.0, 22.0],
    }


ARGS = argparse.Namespace(runs=3)


def test_targets_pass_when_the_ratios_are_met(bench):
    result = bench.summarize(samples([100.0, 120.0, 110.0], [150.0, 160.0, 170.0], [30.0, 35.0, 200.0],
                                     [10.0, 11.0, 12.0], [60.0, 61.0, 59.0]), {}, ARGS)
    assert result["median_seconds"]["first_run"][2] == 110.0  # the median, not the mean
    assert result["ratios"] == {"rerun_ratio": 0.318, "scale_ratio": 1.455, "uv_speedup_cold": 5.5,
                                "uv_speedup_warm": 10.5}
    assert all(target["pass"] for target in result["targets"].values())
    json.dumps(result)  # what bench writes must serialize


def test_each_target_fails_on_its_own(bench):
    result = bench.summarize(samples([100.0] * 3, [200.0] * 3, [40.0] * 3, [20.0] * 3, [60.0] * 3), {}, ARGS)
    verdicts = {key: target["pass"] for key, target in result["targets"].items()}
    assert verdicts == {"rerun_ratio": False, "scale_ratio": False, "uv_speedup_cold": False,
                        "uv_speedup_warm": True}


def test_table_shows_figures_and_verdicts(bench):
    result = bench.summarize(samples([100.0] * 3, [200.0] * 3, [30.0] * 3, [10.0] * 3, [60.0] * 3),
                             {"default (ansible.cfg)": 30.0, "pipelining off": 55.5}, ARGS)
    text = bench.table(result)
    assert "| 2 | 100.0 s | 30.0 s | 30% | 0 |" in text
    assert "| pipelining off | 55.5 |" in text
    assert "| first run, 8 workers / 2 workers | 2.0 | <= 1.6 | FAIL |" in text
    assert "| no-change re-run / first run (2 workers) | 0.3 | <= 0.35 | pass |" in text
