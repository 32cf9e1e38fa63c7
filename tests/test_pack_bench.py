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
