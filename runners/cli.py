"""`scaling`: the command line. Bad input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path


def _user_errors() -> tuple[type[Exception], ...]:
    """The exception classes whose message is meant for the user (one line each)."""
    from fitting.errors import FitInputError
    from runners.data.store import DataError
    from runners.tracking.results import NotInStore
    from sweeps.errors import SpecError

    return (SpecError, FitInputError, DataError, NotInStore)


def _spec(args):
    from sweeps.spec import load_spec

    return load_spec(args.spec)


def cmd_plan(args) -> int:
    from runners import pipeline

    spec = _spec(args)
    planned = pipeline.plan(spec)
    table = pipeline.plan_table(spec, planned)
    if args.format == "csv":
        pipeline.write_plan_csv(table, args.out)
    else:
        pipeline.print_plan(spec, table)
    pipeline.print_caveats(spec, planned)
    return 0


def cmd_run(args) -> int:
    from runners import pipeline

    return pipeline.run(_spec(args), address=args.address, fit=not args.no_fit, cache_dir=args.cache_dir)


def cmd_export(args) -> int:
    from runners import pipeline
    from runners.job import refuse_if_lost
    from runners.tracking.runs import SweepRuns

    spec = _spec(args)
    refuse_if_lost(spec)
    pipeline.export(spec, SweepRuns(spec.name, description=spec.description))
    return 0


def cmd_pull(args) -> int:
    from runners.tracking.results import pull
    from runners.tracking.runs import tracking_uri

    spec = _spec(args)
    out = args.out or spec.results_dir / spec.name
    uri = tracking_uri()
    files = pull(spec.name, uri, out)
    print(f"pulled sweep {spec.name} from {uri}: {len(files)} files into {out}: "
          + ", ".join(str(f.relative_to(out)) for f in files))
    return 0


def cmd_status(args) -> int:
    from rich.table import Table

    from runners import pipeline

    table = pipeline.status(_spec(args))
    show = Table(title="trials")
    for c in table.columns:
        show.add_column(c)
    for _, r in table.iterrows():
        show.add_row(*["" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    pipeline.console.print(show)
    pipeline.console.print(table.status.value_counts().to_string())
    return 0


def cmd_ui(args) -> int:
    from runners.tracking.runs import client, runs_url_base, sweep_links, tracking_uri

    uri = args.uri or tracking_uri()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    from mlflow.exceptions import MlflowException

    base = runs_url_base(args.host, args.port)
    try:  # read before the server starts, so the two never both create a new store's tables
        links = sweep_links(client(uri), base)
    except MlflowException:  # a store the server cannot open either: it says why (--verbose)
        links = []
    print(f"MLflow UI for {uri} on {base} (Ctrl-C stops it)", flush=True)
    for sweep, url in links:  # each sweep's runs page, filtered to its trials (runners.tracking.runs.trials_filter)
        print(f"  {sweep}: {url}", flush=True)
    # its own process group: the server's workers are its children, and stopping the UI stops them all
    server = subprocess.Popen(cmd, env=env, start_new_session=True,
                              stdout=None if args.verbose else subprocess.DEVNULL, stderr=None if args.verbose else subprocess.DEVNULL)
    try:
        code = server.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main)
        return 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    if code and not args.verbose:
        print(f"error: the MLflow server exited with code {code}; run `scaling ui --verbose` to see why",
              file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    from fitting.commands import add_compare_parser, add_fit_parser, add_predict_parser

    parser = argparse.ArgumentParser(prog="scaling", description="Scaling-law sweeps on Ray, tracked in MLflow, fitted into laws.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="expand a spec into trials and show counts, FLOPs and time, running nothing")
    p.add_argument("spec", type=Path)
    p.add_argument("--format", choices=["table", "csv"], default="table")
    p.add_argument("--out", type=Path, help="write the CSV here instead of stdout")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run every trial not yet done, then fit and export the law")
    p.add_argument("spec", type=Path)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-fit", action="store_true", help="train only; export later with `scaling export`")
    p.add_argument("--cache-dir", type=Path, default=None, help="token cache (default: $SCALING_CACHE or ~/.cache/scaling-harness)")
    p.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own start-up logs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("export", help="collect the sweep's points from MLflow, fit, and write results/<sweep>/")
    p.add_argument("spec", type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pull", help="bring a sweep's results (points, law, plots) from its MLflow run into results/<sweep>/")
    p.add_argument("spec", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write here instead of the spec's results_dir/<name>/")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("status", help="each trial's state from MLflow")
    p.add_argument("spec", type=Path)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 for the store sweeps log to")
    p.add_argument("--uri", default=None, help="tracking store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--verbose", action="store_true", help="show the server's own log")
    p.set_defaults(func=cmd_ui)

    add_fit_parser(sub)
    add_predict_parser(sub)
    add_compare_parser(sub)
    return parser


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C, taken by whoever takes Ctrl-C now (the sweep's loop takes it between polls)."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):  # MLflow's and Ray's start-up lines, here and in the workers
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("SCALING_RAY_LOG_LEVEL", "ERROR")
    # SIGTERM stops what this command started (Ray, trials, an MLflow server) the way Ctrl-C does
    before = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the trials (which stop themselves): planning, collecting or fitting
        print("interrupted: finished trials are kept in MLflow; run the same command to go on", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
