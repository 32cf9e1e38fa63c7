"""`resources.gpus: auto` with a time target: the fewest GPUs (a power of two) that hold a trial's memory and train
it within max_hours, capped by max_gpus with one warning; the plan shows GPUs and hours. No Ray, no training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

from runners import pipeline
from runners.cli import main
from runners.scheduling.resources import GANG_EFFICIENCY, gang_size, member_bytes, time_target_warning
from sweeps.errors import SpecError
from sweeps.spec import load_spec
from tests.helpers import tiny_spec

PEAK = 1e15  # a stated GPU peak (FLOP/s) and efficiency: the expected sizes follow from them below
MFU = 0.5
GRID = {"sizes": [3000], "tokens": [20_000, 200_000]}  # the same model on 10x the tokens: 10x the compute


def one_trial(tmp_path, **resources):
    spec = load_spec(tiny_spec(tmp_path, grid={"sizes": [3000], "tokens": [20_000]},
                               resources={"gpus": "auto", "assumed_mfu": MFU} | resources))
    (planned,) = pipeline.plan(spec)
    return spec, planned


def test_a_trial_gets_the_fewest_gpus_that_meet_the_time_target(tmp_path):
    spec, p = one_trial(tmp_path)
    peak = p.compute_exact / (3.2 * 3600 * MFU)  # the peak at which the trial takes 3.2 h on one GPU
    # W GPUs take 3.2 / (W x GANG_EFFICIENCY) h: 2 -> 1.78 h, 4 -> 0.89 h, so a 1 h target needs 4
    assert 3.2 / (2 * GANG_EFFICIENCY) > 1 >= 3.2 / (4 * GANG_EFFICIENCY)
    target = spec.resources.model_copy(update={"max_hours": 1.0})
    assert gang_size(p, target, spec.runtime, None, peak) == 4
    assert gang_size(p, target.model_copy(update={"max_hours": 3.3}), spec.runtime, None, peak) == 1
    assert gang_size(p, target.model_copy(update={"max_hours": 2.0}), spec.runtime, None, peak) == 2
    assert time_target_warning([p], target, spec.runtime, None, peak) is None

    capped = target.model_copy(update={"max_gpus": 2})
    assert gang_size(p, capped, spec.runtime, None, peak) == 2
    warning = time_target_warning([p, p], capped, spec.runtime, None, peak)
    expected = 3.2 / (2 * GANG_EFFICIENCY)
    assert "\n" not in warning and "2 trial(s)" in warning and "max_gpus 2" in warning
    assert f"{p.trial_id[:8]} {expected:.1f} h" in warning


def test_memory_still_forces_more_gpus_and_max_hours_none_is_memory_only(tmp_path):
    spec, p = one_trial(tmp_path)
    need = member_bytes(p, spec.runtime)
    target = spec.resources.model_copy(update={"max_hours": 1e6})  # time asks for one GPU
    assert gang_size(p, target, spec.runtime, int(need / 3.5), PEAK) == 4  # memory asks for four
    peak = p.compute_exact / (20 * 3600 * MFU)  # 20 h on one: 20 / (8 x 0.9) = 2.8 h, 20 / (16 x 0.9) = 1.4 h
    assert gang_size(p, target.model_copy(update={"max_hours": 2.0}), spec.runtime, int(need / 3.5), peak) == 16
    # no target: today's memory rule, whatever the peak
    for gpu in (None, int(need * 1.01), int(need / 1.5), int(need / 3.5)):
        expected = 1 if gpu is None or gpu >= need else 2 if gpu >= need / 2 else 4
        assert gang_size(p, spec.resources, spec.runtime, gpu, peak) == expected
    assert time_target_warning([p], spec.resources, spec.runtime, None, peak) is None
    with pytest.raises(SpecError, match="needs 4 GPUs of memory, more than resources.max_gpus 2"):
        gang_size(p, target.model_copy(update={"max_gpus": 2}), spec.runtime, int(need / 3.5), PEAK)


@pytest.mark.parametrize("resources, expected", [
    ({"max_hours": 0}, "resources.max_hours = 0: Input should be greater than 0"),
    ({"max_gpus": 6}, "resources.max_gpus = 6: a gang under gpus 'auto' is a power of two; use 4 or 8"),
    ({"max_gpus": 0}, "resources.max_gpus = 0: Input should be greater than or equal to 1"),
    ({"assumed_mfu": 1.5}, "resources.assumed_mfu = 1.5: Input should be less than or equal to 1"),
    ({"peak_tflops": -1}, "resources.peak_tflops = -1: Input should be greater than 0"),
    ({"gpus": 2, "max_hours": 1}, "max_hours sizes the gangs of gpus 'auto'; with gpus 2 declared"),
])
def test_bad_time_targets_give_one_line_and_exit_2(tmp_path, capsys, resources, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "grid": {"sizes": [2e4], "tokens": [1e5]}, "resources": resources}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err


def test_plan_shows_gpus_and_hours_in_80_columns(tmp_path, monkeypatch):
    """Two trials: at a peak where the larger takes 3.2 h on one GPU and max_hours 1, it gets 4 GPUs and
    3.2 / (4 x GANG_EFFICIENCY) h; the smaller, under an hour on one, keeps a share (memory unknown: '<=1')."""
    base = load_spec(tiny_spec(tmp_path, name="probe", grid=GRID))
    small, big = sorted(pipeline.plan(base), key=lambda p: p.compute_exact)
    peak = big.compute_exact / (3.2 * 3600 * MFU)
    assert small.compute_exact / (peak * MFU) / 3600 <= 1
    path = tiny_spec(tmp_path, grid=GRID,
                     resources={"gpus": "auto", "max_hours": 1, "assumed_mfu": MFU, "peak_tflops": peak / 1e12})
    out = tmp_path / "plan.csv"
    assert main(["plan", str(path), "--format", "csv", "--out", str(out)]) == 0
    table = pd.read_csv(out).set_index("trial_id")
    assert table.loc[big.trial_id, "gpus"] == 4
    assert table.loc[big.trial_id, "est_seconds"] == pytest.approx(3.2 / (4 * GANG_EFFICIENCY) * 3600)
    assert pd.isna(table.loc[small.trial_id, "gpus"])
    assert table.loc[small.trial_id, "est_seconds"] == pytest.approx(small.compute_exact / (peak * MFU))

    screen = Console(width=80, record=True)
    monkeypatch.setattr(pipeline, "console", screen)
    assert main(["plan", str(path)]) == 0
    text = screen.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    row = next(line for line in text.splitlines() if pipeline.trial_run_name(big) in line)
    assert " 4 " in row and f"{3.2 / (4 * GANG_EFFICIENCY) * 60:.1f} min" in row
    assert "GPUs" in text and "<=1" in text and "max_hours 1" in text and "warning" not in text


def test_the_committed_quickstart_spec_is_what_export_writes():
    """`scaling export` writes the spec as validated, every default out: a field added to the spec must come with
    results/quickstart/spec.yaml written again, or a re-run would not reproduce the folder byte for byte."""
    root = Path(__file__).parents[1]
    spec = load_spec(root / "sweeps/examples/quickstart.yaml")
    written = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
    assert written == (root / "results/quickstart/spec.yaml").read_text()
