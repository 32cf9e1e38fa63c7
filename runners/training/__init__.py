"""Training one trial, on whatever device it was given: no Ray, no MLflow client, only a sink to log into.

schedule.py turns a TrialConfig into a plan of steps (batch, accumulation, lr schedule, evaluations, WSD
branches); step.py is the optimizer step and the evaluation; parallel.py the same trial on a group of processes
(DDP or FSDP2, each rank's share of a batch); checkpoint.py saves and loads where a trial is (DCP, resharded);
engine.py is how the members of a timeline compute (one model; pack.py's PackedEngine trains several trials as
one stacked model, with packed_optim.py's per-member AdamW); timeline.py is one trial's place on a timeline
(its sink, progress and result.json); train.py runs the plan (resume, branches, divergence, where the time went)
for one trial or a pack; result.py is what it gives back. Its contract is
`train.run_trial(TrialConfig, Runtime, workdir, sink, data=TokenData) -> TrialResult` and `pack.run_pack`.
"""
