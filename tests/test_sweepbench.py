"""The sweep benchmarks: busy fraction from nvidia-smi's own CSV format; windows, FLOPs and time shares of real
sweeps; a packed sweep against its unpacked twin (pack_sweep)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from runners.bench.sweepstats import busy_fraction


def test_busy_fraction_is_the_mean_utilisation_inside_the_window(tmp_path):
    lines = [f"2026/11/28 06:38:{s:02d}.{ms:03d}, {gpu}, {util} %, 5790 MiB"
             for s, (u0, u1) in enumerate([(100, 0), (50, 0), (0, 100), (100, 100)]) for ms, gpu, util in ((4, 0, u0), (8, 1, u1))]
    csv = tmp_path / "util.csv"
    csv.write_text("\n".join(lines) + "\n")
    at = lambda s: datetime(2026, 11, 28, 6, 38, s, tzinfo=timezone.utc).timestamp()  # noqa: E731
    assert busy_fraction(csv, (at(0), at(2))) == {0: pytest.approx(0.75), 1: pytest.approx(0.0)}
    assert busy_fraction(csv, (at(2), at(4))) == {0: pytest.approx(0.5), 1: pytest.approx(1.0)}


def test_trial_runs_reads_each_trials_window_and_flops_from_a_real_sweep(tmp_path, sqlite_uri, local_ray):
    import mlflow
    import pandas as pd

    from runners.cli import main
    from runners.bench.sweepstats import data_prep_seconds, flops_between, time_shares, trial_runs, window, within_samples
    from sweeps.spec import load_spec
    from tests.helpers import tiny_spec

    spec = tiny_spec(tmp_path, name="stats", train={"lr": [3e-3, 1e-2]})  # 4 shapes x 2 lrs: 4 packs of 2
    assert main(["plan", str(spec), "--format", "csv", "--out", str(tmp_path / "plan.csv")]) == 0
    assert main(["run", str(spec), "--no-fit"]) == 0
    mlflow.set_tracking_uri(sqlite_uri)
    runs = trial_runs("stats")
    planned = pd.read_csv(tmp_path / "plan.csv")
    assert len(runs) == len(planned)
    assert runs.flops.sum() == pytest.approx(planned.flops_exact.sum())
    assert ((runs.start < runs.first_step) & (runs.first_step < runs.end)).all()
    # where the time went: logged by every trial; a pack's members share one process (and its start)
    assert runs.task.nunique() == 4 and (runs.groupby("task").setup.nunique() == 1).all()
    assert runs.total.notna().all() and (runs.total <= runs.end - runs.start + 1.0).all()
    shares = time_shares(runs)
    assert min(shares.values()) >= 0 and shares["train"] > 0 and sum(shares.values()) == pytest.approx(1.0)
    assert data_prep_seconds(load_spec(spec)) > 0  # its token cache, built before the first trial
    # FLOPs inside a window, from the logged FLOPs so far: the whole window holds every trial's exact FLOPs; a
    # device call's samples that begin mid-sweep clip the window, and the FLOPs are those done after they began
    start, end = window(runs)
    assert flops_between(runs.run_id, (start, end)) == pytest.approx(runs.flops.sum(), rel=1e-6)
    middle = float(runs.first_step.sort_values().iloc[len(runs) // 2])  # a step that was logged
    util = tmp_path / "util.csv"
    util.write_text("".join(f"{datetime.fromtimestamp(t, timezone.utc):%Y/%m/%d %H:%M:%S.%f}, 0, 50 %, 9 MiB\n"
                            for t in (middle - 1e-3, end + 60)))
    assert within_samples(runs, util) == pytest.approx((middle, end), abs=1e-3)  # its first step; nvidia-smi's ms
    later = flops_between(runs.run_id, (middle, end))
    assert 0 < later < runs.flops.sum()
    # the same trials one task each, in the same store: pack_sweep's twin, and its figures from the two windows
    import json

    from runners.bench import pack_sweep

    (tmp_path / "twin").mkdir()  # its own checkpoints: the twins' trial ids are the same
    twin = tiny_spec(tmp_path / "twin", name="stats_unpacked", train={"lr": [3e-3, 1e-2]}, runtime={"pack": "off"})
    assert main(["run", str(twin), "--no-fit"]) == 0
    mlflow.set_tracking_uri(sqlite_uri)
    unpacked = trial_runs("stats_unpacked")
    assert unpacked.task.nunique() == len(unpacked) == len(runs)
    log = tmp_path / "bench.jsonl"
    pack_sweep.main([str(spec), str(twin), "--log", str(log)])
    (line,) = [json.loads(s) for s in log.read_text().splitlines()]  # no GPU peak here: speedup_wall alone
    windows = [r.end.max() - r.start.min() for r in (runs, unpacked)]
    assert line["metric"] == "speedup_wall" and line["value"] == pytest.approx(windows[1] / windows[0], abs=1e-4)
    assert line["config"]["trials"] == len(runs)
    with pytest.raises(SystemExit, match="not twins"):
        pack_sweep.compare(runs, unpacked.iloc[1:], gpus=1, peak=None)
