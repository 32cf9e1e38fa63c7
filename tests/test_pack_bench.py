"""The pack benchmark runs (--quick, CPU) and logs every figure it names, with the shape it measured."""

from __future__ import annotations

import json

import pytest

from runners.bench.pack import main


def test_quick_pack_benchmark_logs_its_figures(tmp_path):
    log = tmp_path / "benchmarks.jsonl"
    main(["--quick", "--members", "2", "--log", str(log)])
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {line["metric"] for line in lines} == {"tokens_per_s", "speedup_vs_single", "speedup_vs_processes"}
    figures = {line["metric"]: line["value"] for line in lines}
    config = lines[0]["config"]
    assert lines[0]["benchmark"] == "pack" and config["members"] == 2 and config["d_model"] == 64
    assert figures["tokens_per_s"] > 0
    # the ratios are what the logged throughputs say (rounded to whole tokens/s in the config)
    assert figures["speedup_vs_single"] * config["single_tokens_per_s"] == pytest.approx(figures["tokens_per_s"], rel=0.01)
    assert figures["speedup_vs_processes"] * config["processes_tokens_per_s"] == pytest.approx(figures["tokens_per_s"], rel=0.01)


def test_packs_past_max_processes_are_compared_with_that_many_processes_measured_once(tmp_path):
    log = tmp_path / "benchmarks.jsonl"
    main(["--quick", "--members", "1,2,3", "--max-processes", "2", "--log", str(log)])
    configs = {line["config"]["members"]: line["config"] for line in map(json.loads, log.read_text().splitlines())}
    assert [configs[k]["processes_at_once"] for k in (1, 2, 3)] == [1, 2, 2]
    assert configs[3]["processes_tokens_per_s"] == configs[2]["processes_tokens_per_s"]  # the waves' pace, once
    assert configs[1]["processes_tokens_per_s"] != configs[2]["processes_tokens_per_s"]
