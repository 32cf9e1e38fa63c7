"""What the MLflow UI shows of a sweep (issue 23), read back through MLflow's client: an experiment of
training runs with the spec's description, trial runs named by what they are, starting when their training
starts and ending with it, a link that lists the sweep's trials, and a parent run that ends with the sweep and
carries the fitted law."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from fitting import fit_law, lawfile, laws
from runners import pipeline
from runners.scheduling.sweep import register, trial_job
from runners.scheduling.worker import PackJob, run_job, run_pack_job
from runners.tracking import names
from runners.tracking.labels import short
from runners.tracking.runs import SweepRuns, set_status, sweep_links
from sweeps.spec import load_spec
from tests.conftest import free_port, stop, wait_until_up
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parent.parent
RUN_NAME = re.compile(r"^dense d\d+x\d+ N[\d.]+[kM]? D[\d.]+[kM] lr3e-3 s0$")


def floorless_law() -> dict:
    """A chinchilla law file fitted to points with no loss floor: E is not identified, the rest is."""
    rng = np.random.default_rng(0)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
    loss = laws.chinchilla(N, D, E=0.0, A=406.4, B=410.7, alpha=0.34, beta=0.28) * (1 + 0.005 * rng.standard_normal(25))
    section = fit_law(pd.DataFrame({"N": N, "D": D, "loss": loss}), "chinchilla", bootstrap=20,
                      grid={"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.3, 0.6), "beta": (0.3,)})
    return lawfile.document({"chinchilla": section}, conventions=lawfile.conventions(params="active", flops="6N"),
                            meta={})


def check_sweep_in_mlflow(client: MlflowClient, sweep: str, description: str, parent_status: str) -> None:
    """Everything issue 23 asks of the UI that the store holds."""
    (experiment,) = [e for e in client.search_experiments() if e.name == sweep]
    assert experiment.tags[names.EXPERIMENT_KIND] == "custom_model_development"
    assert experiment.tags[names.NOTE] == description
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in found if r.data.tags[names.TAG_ROLE] == names.ROLE_SWEEP]
    assert parent.info.status == parent_status and parent.info.end_time >= parent.info.start_time
    trials = [r for r in found if r.data.tags[names.TAG_ROLE] == names.ROLE_TRIAL]
    assert trials
    for r in trials:
        assert RUN_NAME.match(r.info.run_name), r.info.run_name
        assert f" N{short(int(r.data.params[names.PARAM_N_ACTIVE]))} D{short(int(r.data.params[names.PARAM_D]))} " \
               in r.info.run_name
        assert r.data.tags[names.TAG_TRIAL_ID] == r.data.params[names.PARAM_TRIAL_ID]
    run_of = {r.data.tags[names.TAG_TRIAL_ID]: r.info.run_id for r in trials}
    for r in found:
        if r.data.tags[names.TAG_ROLE] == names.ROLE_BRANCH:
            assert RUN_NAME.match(r.info.run_name.split(" > D")[0]) and " > D" in r.info.run_name
            # nested under its trial's run, not under the sweep's: the trials stay rows of their own
            assert r.data.tags[names.PARENT_RUN] == run_of[r.data.tags[names.TAG_PARENT_TRIAL]]
        else:
            assert names.PARENT_RUN not in r.data.tags
    metrics, tags = parent.data.metrics, parent.data.tags
    for k in ("alpha", "beta", "a"):
        key = f"law/chinchilla/{k}"
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
    assert tags["law/main"] == "chinchilla" and "N: active" in tags["law/conventions"]


def test_a_sweep_reads_back_as_the_ui_shows_it(tmp_path, sqlite_uri):
    spec = load_spec(tiny_spec(tmp_path, name="ui", description="a tiny sweep for the UI test",
                               train={"branches_per_run": 1}))
    runs = SweepRuns(spec.name, sqlite_uri, description=spec.description)
    for p in pipeline.plan(spec):
        register(runs, p)
    runs.sweep_started()
    assert runs.client.get_run(runs.parent_id).info.status == "RUNNING"
    doc = floorless_law()
    runs.log_summary(doc)
    runs.sweep_ended(names.FINISHED)
    check_sweep_in_mlflow(runs.client, "ui", spec.description, "FINISHED")
    parent = runs.client.get_run(runs.parent_id).data
    assert "law/chinchilla/E" not in parent.metrics  # not identified: a tag with the reason, never a number
    assert parent.tags["law/chinchilla/E"].startswith("not identified: ")
    again = SweepRuns(spec.name, sqlite_uri, description=spec.description)  # a re-run reopens the same parent
    again.sweep_started()
    again.sweep_ended(names.KILLED)
    assert again.parent_id == runs.parent_id and runs.client.get_run(runs.parent_id).info.status == "KILLED"


def now_ms() -> int:
    return int(time.time() * 1000)


def test_a_trial_run_starts_when_its_training_starts_and_ends_with_it(tmp_path, sqlite_uri):
    """Queued trials write nothing to MLflow; a trial's run is created when a worker starts it (alone, or with its
    pack), so its start time (and the UI's Duration) leaves out the time it waited, and it ends after its last
    metric. A trial started again (a resume, a re-run) finds the same runs and logs nothing twice."""
    spec = load_spec(tiny_spec(tmp_path, name="starts", grid={"sizes": [3000], "tokens": [20_000]},
                               train={"lr": [1e-3, 3e-3, 1e-2], "branches_per_run": 1}))
    runs = SweepRuns(spec.name, sqlite_uri, description=spec.description)
    jobs = [trial_job(spec, runs, p, cache_dir=None) for p in pipeline.plan(spec)]  # what the sweep queues on Ray
    assert len(jobs) == 3 and runs.runs(names.ROLE_TRIAL) == runs.runs(names.ROLE_BRANCH) == {}
    time.sleep(2.0)  # waiting in Ray's queue
    pack_began = now_ms()
    run_pack_job(PackJob(tuple(jobs[:2])), on_eval=lambda trial_id: None)
    time.sleep(1.0)
    alone_began = now_ms()
    run_job(jobs[2])
    began = {jobs[0].run.trial_id: pack_began, jobs[1].run.trial_id: pack_began, jobs[2].run.trial_id: alone_began}

    def read_back() -> dict:
        found = runs.runs(names.ROLE_TRIAL) | runs.runs(names.ROLE_BRANCH)
        assert len(found) == 6  # 3 trials, 3 branches: one run each
        return found

    found = read_back()
    steps = {}
    for trial_id, r in found.items():
        assert r.info.status == "FINISHED"
        assert r.info.start_time >= began[r.data.tags.get(names.TAG_PARENT_TRIAL, trial_id)], trial_id
        history = [m for key in r.data.metrics for m in runs.client.get_metric_history(r.info.run_id, key)]
        steps[trial_id] = sorted((m.key, m.step) for m in history)
        assert history and r.info.start_time <= min(m.timestamp for m in history)
        assert r.info.end_time >= max(m.timestamp for m in history)
    run_job(jobs[0])  # started again (a resume or re-run of a trial that is done: no training, the same runs)
    again = read_back()
    for trial_id, r in again.items():
        assert (r.info.run_id, r.info.start_time) == (found[trial_id].info.run_id, found[trial_id].info.start_time)
        history = [m for key in r.data.metrics for m in runs.client.get_metric_history(r.info.run_id, key)]
        assert sorted((m.key, m.step) for m in history) == steps[trial_id]  # nothing logged twice


def test_the_printed_link_lists_exactly_the_sweeps_trials(tmp_path, sqlite_uri, capsys):
    """`scaling ui` and the end of `scaling run` print a runs-page URL whose filter, given to search_runs, gives
    the sweep's trial runs and nothing else (not its parent run, its branches, nor another sweep's trials)."""
    spec = load_spec(tiny_spec(tmp_path, name="ui", train={"branches_per_run": 1}))
    other = load_spec(tiny_spec(tmp_path, name="ui-other", grid={"sizes": [3000], "tokens": [20_000]}))
    for s in (other, spec):
        runs = SweepRuns(s.name, sqlite_uri)
        for p in pipeline.plan(s):
            register(runs, p)
    base = "http://127.0.0.1:5000"
    links = dict(sweep_links(runs.client, base))  # what `scaling ui` prints, one line per sweep
    assert set(links) == {"ui", "ui-other"} and links["ui"] == runs.trials_url(base)
    pipeline._print_link(runs)  # the end of `scaling run`
    assert links["ui"] in capsys.readouterr().out
    page, _, query = links["ui"].partition("?")
    assert page == f"{base}/#/experiments/{runs.experiment_id}/runs"
    (search_filter,) = parse_qs(query)["searchFilter"]
    everything = [e.experiment_id for e in runs.client.search_experiments()]
    found = runs.client.search_runs(everything, search_filter, max_results=1000)
    assert sorted(r.data.tags[names.TAG_TRIAL_ID] for r in found) == sorted(p.trial_id for p in pipeline.plan(spec))
    assert {r.data.tags[names.TAG_ROLE] for r in found} == {names.ROLE_TRIAL}


@pytest.mark.slow
def test_the_runs_page_in_a_headless_browser(tmp_path, sqlite_uri):
    """The quickstart as `scaling ui` shows it, from its committed points and law (no training): a screenshot of
    the runs page. Skipped without Chromium; SCALING_SCREENSHOT=results/quickstart/ui-runs.png keeps the picture (README's)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    spec = load_spec(ROOT / "sweeps/examples/quickstart.yaml")
    points = pd.read_csv(ROOT / "results/quickstart/points.csv")
    runs = SweepRuns(spec.name, sqlite_uri, description=spec.description)
    for p in pipeline.plan(spec):
        run_id, branches = register(runs, p)
        curve = points[points.trial_id == p.trial_id]  # the same ids where this Python's stdlib hashes the same
        runs.client.log_batch(run_id, metrics=[Metric(names.VAL_LOSS, float(r.loss), 0, int(r.tokens))
                                               for r in curve.itertuples()])
        for ended in [run_id, *branches.values()]:
            set_status(runs.client, ended, names.FINISHED)
    runs.log_summary(lawfile.read(ROOT / "results/quickstart/law.json"))
    runs.sweep_ended(names.FINISHED)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "runners.cli", "ui", "--uri", sqlite_uri, "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        printed = [ui.stdout.readline() for _ in range(2)]  # the server's address, then the sweep's link
        (url,) = [line.split(": ", 1)[1].strip() for line in printed if line.startswith(f"  {spec.name}: ")]
        assert url == runs.trials_url(f"http://127.0.0.1:{port}")
        wait_until_up(f"http://127.0.0.1:{port}")
        png = Path(os.environ.get("SCALING_SCREENSHOT") or tmp_path / "runs.png").resolve()
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={png}", "--window-size=1600,900", "--virtual-time-budget=20000", url],
                       check=True, capture_output=True, timeout=180)
        assert png.stat().st_size > 20_000
    finally:
        stop(ui)
