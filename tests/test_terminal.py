"""What a user sees in an 80-column terminal, and what stopping a command leaves behind (issue 23)."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console

from runners import pipeline
from runners.cli import main
from runners.planview import plan_view
from runners.scheduling.progress import SweepProgress
from sweeps.spec import load_spec
from tests.conftest import free_port, wait_until_up
from runners.tracking import names
from runners.tracking.runs import SweepRuns
from tests.helpers import start_driver, tiny_spec, trial_runs, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def lines_at(width: int, render) -> list[str]:
    buffer = io.StringIO()
    render(Console(file=buffer, width=width, force_terminal=True, log_path=False))
    lines = (ANSI.sub("", line) for line in re.split(r"[\r\n]", buffer.getvalue()))
    return [line.rstrip() for line in lines if line.strip()]


def test_the_plan_fits_80_columns_and_names_each_trial(tmp_path):
    spec = load_spec(tiny_spec(tmp_path, train={"lr": [1e-3, 3e-3]}))
    table = pipeline.plan_table(spec, pipeline.plan(spec))
    lines = lines_at(80, lambda c: c.print(plan_view("plan", table, c.width)))
    assert all(len(line) <= 80 for line in lines) and not any("…" in line for line in lines)
    text = "\n".join(lines)
    for name, trial_id in zip(table["name"], table["trial_id"]):
        assert name in text and trial_id[:8] in text  # whole names and ids, never cut
    assert "est. time" in text
    wide = "\n".join(lines_at(200, lambda c: c.print(plan_view("plan", table, c.width))))
    assert "FLOPs (6N)" in wide and "batch" in wide


def test_the_progress_line_fits_80_columns_with_its_eta():
    def render(console):
        progress = SweepProgress(total=140, console=console)
        with progress:
            for i in range(14):
                progress.submitted(f"t{i}", 1e12 * (i + 1))
            progress.update({"running": ["t1", "t2"], "fraction": {"t1": 0.5}})
            progress.finished("t0", "finished")
            progress.finished("t3", "failed")
    lines = lines_at(80, render)
    last = lines[-1]
    assert last.startswith("1/140 done, 0 running, 1 failed") and re.search(r"ETA \d+:\d\d:\d\d$", last), last
    assert all(len(line) <= 80 for line in lines) and not any(".py:" in line for line in lines)


def test_a_top_level_typo_is_named_with_a_suggestion(tmp_path, capsys):
    spec = tiny_spec(tmp_path)
    spec.write_text(spec.read_text().replace("grid:", "grdi:"))
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'grdi'; did you mean 'grid'?" in err and err.count("\n") == 1


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_sigterm_to_scaling_ui_stops_its_server(tmp_path):
    """SIGTERM to the `scaling ui` process alone (as a service manager sends it): the MLflow server and its
    workers, in their own process group, go with it."""
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "runners.cli", "ui", "--uri", f"sqlite:///{tmp_path / 'm.db'}",
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        wait_until_up(f"http://127.0.0.1:{port}")
        servers = [int(p) for p in subprocess.run(["pgrep", "-P", str(ui.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert servers
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _listening(port):
            time.sleep(0.5)
        assert not _listening(port)
        for pid in servers:  # the server's process group is gone: nothing of it left running
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        assert "Traceback" not in ui.stdout.read()
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigterm_to_scaling_run_stops_its_trials_and_its_ray(tmp_path, sqlite_uri):
    """SIGTERM to the driver alone: trials are stopped and marked killed as on Ctrl-C, the sweep's run ends
    KILLED, and nothing of the local Ray it started is left in its session."""
    spec = tiny_spec(tmp_path, name="term", grid={"sizes": [3000, 12000], "tokens": [2_000_000]})
    driver = start_driver(spec, sqlite_uri, "--no-fit")
    try:
        wait_for(lambda: driver.poll() is not None or any(r.data.tags.get(names.TAG_STATUS) == names.RUNNING
                                                          for r in trial_runs("term", sqlite_uri).values()), 300)
        assert driver.poll() is None, driver.communicate()[0]
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 130, out
        runs = SweepRuns("term", sqlite_uri)
        assert runs.client.get_run(runs.parent_id).info.status == "KILLED"
        assert names.RUNNING not in {r.data.tags.get(names.TAG_STATUS) for r in runs.runs(names.ROLE_TRIAL).values()}
        left = lambda: subprocess.run(["pgrep", "-s", str(driver.pid)], capture_output=True, text=True).stdout.split()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and left():
            time.sleep(1)
        assert not left(), subprocess.run(["ps", "-o", "pid,args", "-s", str(driver.pid)], capture_output=True,
                                          text=True).stdout
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
