"""Training one trial, on whatever device it was given: no Ray, no MLflow client, only a sink to log into.

schedule.py turns a TrialConfig into a plan of steps (batch, accumulation, lr schedule, evaluations, WSD
branches); step.py is the optimizer step and the evaluation; parallel.py the same trial on a group of processes
(DDP or FSDP2, each rank's share of a batch); checkpoint.py saves and loads where a trial is (DCP, resharded);
train.py runs the plan (resume, branches, divergence); result.py is what it gives back. Its contract is
`train.run_trial(TrialConfig, Runtime, workdir, sink, data=TokenData) -> TrialResult`.
"""
