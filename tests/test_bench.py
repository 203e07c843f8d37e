"""scripts/bench's arithmetic: medians, the target ratios and their verdicts,
the table and the JSON it writes. The timings themselves are measured by
`make bench`, not here (they are noisy); this checks that a slow result is
reported as a failure and a fast one as a pass."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    loader = importlib.machinery.SourceFileLoader("bench", str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("bench", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def samples(first2, first8, rerun2, uv, pip, scale_up=(50.0, 52.0, 51.0), baked=(40.0, 42.0, 41.0)):
    return {
        "first": {2: first2, 4: [130.0, 131.0, 129.0], 8: first8},
        "rerun": {2: rerun2, 4: [40.0, 41.0, 42.0], 8: [45.0, 44.0, 46.0]},
        "rerun_changed": {2: [0, 0, 0], 4: [0, 0, 0], 8: [0, 0, 0]},
        "scale_up": list(scale_up),
        "uv_cold": uv, "pip_cold": pip, "uv_warm": [2.0, 2.0, 2.0], "pip_warm": [20.0, 21.0, 22.0],
        "bake": [35.0], "baked_first": list(baked),
    }


ARGS = argparse.Namespace(runs=3)


def test_targets_pass_when_the_ratios_are_met(bench):
    result = bench.summarize(samples([100.0, 120.0, 110.0], [150.0, 160.0, 170.0], [20.0, 21.0, 200.0],
                                     [10.0, 11.0, 12.0], [60.0, 61.0, 59.0], scale_up=(40.0, 42.0, 41.0)), {}, ARGS)
    assert result["median_seconds"]["first_run"][2] == 110.0  # the median, not the mean
    assert result["ratios"] == {"rerun_ratio": 0.191, "scale_up_ratio": 0.373, "scale_ratio": 1.455,
                                "baked_ratio": 0.373, "uv_speedup_cold": 5.5, "uv_speedup_warm": 10.5,
                                "first_run_seconds": 110.0}
    assert all(target["pass"] for key, target in result["targets"].items() if key != "first_run_seconds")
    # Seconds depend on the machine: shown with a verdict, marked indicative.
    assert result["targets"]["first_run_seconds"] == {
        "what": "first run to ready, 2 workers, warm package cache (seconds; indicative)", "bound": "<= 60.0",
        "pass": False, "indicative": True}
    assert not any(t["indicative"] for key, t in result["targets"].items() if key != "first_run_seconds")
    json.dumps(result)  # what bench writes must serialize


def test_each_target_fails_on_its_own(bench):
    result = bench.summarize(samples([100.0] * 3, [200.0] * 3, [40.0] * 3, [20.0] * 3, [60.0] * 3,
                                     scale_up=[51.0] * 3, baked=[41.0] * 3), {}, ARGS)
    verdicts = {key: target["pass"] for key, target in result["targets"].items()}
    assert verdicts == {"rerun_ratio": False, "scale_up_ratio": False, "scale_ratio": False, "baked_ratio": False,
                        "uv_speedup_cold": False, "uv_speedup_warm": True, "first_run_seconds": False}
    result = bench.summarize(samples([50.0] * 3, [80.0] * 3, [9.0] * 3, [10.0] * 3, [60.0] * 3,
                                     scale_up=[19.0] * 3, baked=[20.0] * 3), {}, ARGS)
    assert all(target["pass"] for target in result["targets"].values()), result["targets"]


def test_the_floor_is_a_target_for_the_first_run_and_reported_for_the_re_run(bench):
    base = samples([100.0] * 3, [150.0] * 3, [20.0] * 3, [10.0] * 3, [60.0] * 3)
    result = bench.summarize(dict(base, floor=[40.0, 45.0, 39.0]), {}, ARGS)
    assert result["median_seconds"]["floor"] == 40.0
    assert result["ratios"]["floor_ratio"] == 2.5 and result["targets"]["floor_ratio"]["pass"]
    assert result["ratios"]["rerun_floor_ratio"] == 0.5 and result["targets"]["rerun_floor_ratio"]["indicative"]
    text = bench.table(result)
    assert "| first run / the floor (2 workers) | 2.5 | <= 2.5 | pass |" in text
    assert "no Ansible), 2 workers: 40.0 s" in text
    slow = bench.summarize(dict(base, floor=[39.0] * 3), {}, ARGS)
    assert not slow["targets"]["floor_ratio"]["pass"]
    assert "floor_ratio" not in bench.summarize(base, {}, ARGS)["targets"]


def test_without_a_baked_image_there_is_no_baked_target(bench):
    result = bench.summarize(samples([100.0] * 3, [150.0] * 3, [20.0] * 3, [10.0] * 3, [60.0] * 3, baked=[]), {}, ARGS)
    assert "baked_ratio" not in result["targets"]
    assert result["median_seconds"]["baked_first_run"] is None


def test_table_shows_figures_and_verdicts(bench):
    result = bench.summarize(samples([100.0] * 3, [200.0] * 3, [30.0] * 3, [10.0] * 3, [60.0] * 3),
                             {"default (ansible.cfg)": 30.0, "pipelining off": 55.5}, ARGS)
    text = bench.table(result)
    assert "| 2 | 100.0 s | 30.0 s | 30% | 0 |" in text
    assert "| pipelining off | 55.5 |" in text
    assert "| first run, 8 workers / 2 workers | 2.0 | <= 1.6 | FAIL |" in text
    assert "| no-change re-run / first run (2 workers) | 0.3 | <= 0.2 | FAIL |" in text
    assert "| scale-up 2 to 4 workers / first run of 2 | 0.51 | <= 0.4 | FAIL |" in text
    assert "| first run from a baked image / from the stock image (2 workers) | 0.41 | <= 0.4 | FAIL |" in text
    assert "| first run to ready, 2 workers, warm package cache (seconds; indicative) | 100.0 | <= 60.0 | " \
           "FAIL (indicative) |" in text
    assert "- From a baked image (bake.yml, 35.0 s once): first run to ready, 2 workers: 41.0 s" in text


def test_make_test_time_is_a_target_and_a_failed_run_is_a_miss(bench):
    base = samples([100.0] * 3, [150.0] * 3, [20.0] * 3, [10.0] * 3, [60.0] * 3)
    fast = dict(base, make_test={"minutes": 38.5, "passed": True, "commit": "abc", "date": "2026-11-23T15:00:00Z"})
    result = bench.summarize(fast, {}, ARGS)
    assert result["ratios"]["make_test_minutes"] == 38.5 and result["targets"]["make_test_minutes"]["pass"]
    text = bench.table(result)
    assert "| make test in a fresh clone (minutes) | 38.5 | <= 45.0 | pass |" in text
    assert "- make test in a fresh clone: 38.5 min at abc, 2026-11-23T15:00:00Z (passed;" in text
    slow = dict(base, make_test={"minutes": 52.0, "passed": True, "commit": "abc", "date": "x"})
    assert not bench.summarize(slow, {}, ARGS)["targets"]["make_test_minutes"]["pass"]
    failed = dict(base, make_test={"minutes": 20.0, "passed": False, "commit": "abc", "date": "x"})
    assert not bench.summarize(failed, {}, ARGS)["targets"]["make_test_minutes"]["pass"]
    assert "make_test_minutes" not in bench.summarize(base, {}, ARGS)["targets"]


def test_results_go_into_the_performance_page(bench, tmp_path):
    """--update-docs rewrites docs/performance.md's bench block (README.md's before the split), plot linked from there."""
    assert bench.RESULTS_PAGE == ROOT / "docs" / "performance.md"
    shipped = bench.RESULTS_PAGE.read_text()
    assert shipped.count("<!-- bench:start -->") == 1 and shipped.count("<!-- bench:end -->") == 1
    assert "](../bench/bench.png)" in shipped.split("<!-- bench:start -->")[1].split("<!-- bench:end -->")[0]
    page = tmp_path / "docs" / "performance.md"
    page.parent.mkdir()
    page.write_text("# Performance\n\nbefore\n<!-- bench:start -->\nold figures\n<!-- bench:end -->\nafter\n")
    bench.update_docs("| new | figures |", page)
    text = page.read_text()
    assert "old figures" not in text and "| new | figures |" in text
    assert text.startswith("# Performance\n\nbefore\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert f"]({os.path.relpath(ROOT / 'bench' / 'bench.png', page.parent)})" in text
    page.write_text("# Performance\n\nno markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:start -->"):
        bench.update_docs("x", page)


def test_the_emulators_targets_stand_beside_dockers_and_fail_on_their_own(bench):
    docker = bench.summarize(samples([100.0] * 3, [150.0] * 3, [15.0] * 3, [10.0] * 3, [60.0] * 3,
                                     scale_up=[30.0] * 3, baked=[30.0] * 3), {}, ARGS)
    aws_samples = dict(samples([200.0] * 3, [], [50.0] * 3, [], [], scale_up=[70.0] * 3, baked=[60.0] * 3),
                       first={2: [200.0] * 3}, rerun={2: [50.0] * 3}, rerun_changed={2: [0, 0, 0]})
    result = bench.combine(docker, bench.summarize(aws_samples, {}, ARGS))
    assert result["targets"]["rerun_ratio"]["pass"] and not result["targets"]["aws_rerun_ratio"]["pass"]
    assert result["ratios"]["aws_rerun_ratio"] == 0.25 and result["ratios"]["aws_baked_ratio"] == 0.3
    assert result["targets"]["aws_scale_up_ratio"]["pass"] and result["targets"]["aws_baked_ratio"]["pass"]
    assert "aws_rerun_ratio" not in docker["targets"]  # the docker result itself is left as it was
    text = bench.table(result)
    assert "- 2 workers: first run to ready 200.0 s, no-change re-run 50.0 s (changed=0)" in text
    assert "| EC2 emulator: no-change re-run / first run (2 workers) | 0.25 | <= 0.2 | FAIL |" in text
    json.dumps(result)


def test_the_time_from_scale_to_joined_workers_is_reported_for_the_emulator(bench):
    docker = bench.summarize(samples([100.0] * 3, [150.0] * 3, [15.0] * 3, [10.0] * 3, [60.0] * 3), {}, ARGS)
    aws_samples = dict(samples([200.0] * 3, [], [50.0] * 3, [], []), first={2: [200.0] * 3}, rerun={2: [50.0] * 3},
                       rerun_changed={2: [0, 0, 0]}, python_scale=[12.0, 9.0, 30.0])
    result = bench.combine(docker, bench.summarize(aws_samples, {}, ARGS))
    assert result["aws"]["median_seconds"]["scale_from_python_1_to_3"] == 12.0
    assert docker["median_seconds"]["scale_from_python_1_to_3"] is None
    text = bench.table(result)
    assert "- Scale from Python, `Cluster.scale(3)` on 1 worker (scale_maximum 3, baked AMI) to 3 workers joined: " \
           "12.0 s (the emulator's machines are containers" in text
    assert "Scale from Python" not in bench.table(docker)
