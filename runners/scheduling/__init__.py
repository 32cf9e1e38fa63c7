"""Scheduling trials on Ray: which trial runs where, when, and how often it is retried.

sweep.py submits one Ray task per trial with the resources resources.py declares, and waits, retries and
cancels; gang.py starts a trial that spans several workers (Ray Train); worker.py is what runs inside the task
(or each rank of a gang) (data, training, MLflow status); search.py is where trials
come from (a fixed grid, or Optuna studies per scale); progress.py shows the sweep live. Its contract is
`sweep.run_trials(...) -> SweepOutcome`: every trial finished, failed, diverged, pruned or killed, as MLflow says.
"""
