"""Scheduling trials on Ray: which trial runs where, when, and how often it is retried.

sweep.py submits one Ray task per trial, or per pack of trials trained as one stacked model, with the resources
and pack sizes resources.py decides, and waits, retries and cancels; gang.py starts a trial that spans several
workers (Ray Train); worker.py is what runs inside the task (or each rank of a gang) (data, training, MLflow status
of every member); search.py is where trials come from (a fixed grid, or Optuna studies per scale); progress.py
shows the sweep live. Its contract is
`sweep.run_trials(...) -> SweepOutcome`: every trial finished, failed, diverged, pruned or killed, as MLflow says.
"""
