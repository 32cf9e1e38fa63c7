"""MLflow names: the one place that says what every run, tag, param and metric is called.

One experiment per sweep (named after the sweep, described by the spec's description); in it one parent
run for the sweep (RUNNING while `scaling run` runs, then FINISHED, FAILED or KILLED; it carries the fitted
law as metrics, runners/tracking/summary.py) and one run per trial, named by what the trial is
(runners/tracking/labels.py), created when the trial starts training (runners/tracking/runs.py: open_run) and not
nested under the parent run, so the runs page lists the trials as rows. A WSD branch (a decay forked from a
trial's stable phase) is a run of its own, nested under its trial's run and tagged with its parent trial's id, so
each branch is a final point in the points table.
Metric steps are tokens seen, so curves of different batch sizes line up.
"""

# Tags
TAG_ROLE = "scaling.role"            # "sweep" | "trial" | "branch"
TAG_SWEEP = "scaling.sweep"          # sweep name
TAG_TRIAL_ID = "scaling.trial_id"    # trial (or branch) id
TAG_PARENT_TRIAL = "scaling.parent_trial_id"  # branches only
TAG_STATUS = "scaling.status"        # one of STATUSES
TAG_ERROR = "scaling.error"          # one line: why a trial failed or diverged
TAG_DIVERGED_STEP = "scaling.diverged_at_tokens"
TAG_REPEATS_DATA = "scaling.repeats_data"  # "true" when a trial saw some training tokens twice
TAG_WORKER = "scaling.worker"        # host:pid of the process training the trial (the latest attempt)
TAG_NODE = "scaling.node"            # Ray node id of that process
TAG_GPUS = "scaling.gpus"            # GPU ids Ray gave that process ("" on CPU)
TAG_WORLD = "scaling.world_size"     # processes training the trial (a gang: W ranks; the tags above are rank 0's)
TAG_PARALLEL = "scaling.parallel"    # how a gang shares the model: ddp | fsdp ("none" for one process)
TAG_EXPERT_PARALLEL = "scaling.expert_parallel"  # "true" when the trial's experts were sharded over its ranks, else "false"
TAG_RANK_WORKERS = "scaling.rank_workers"  # a gang's host:pid of each rank, comma-separated in rank order
TAG_RANK_NODES = "scaling.rank_nodes"      # a gang's Ray node id of each rank, comma-separated in rank order
TAG_CUDA = "scaling.cuda_device"     # the GPU torch trains on, as Ray names it (GPU workers only)
TAG_PACK = "scaling.pack"            # the trial ids of the pack it trained in, space-separated (packed trials only)
TAG_NUMERICS = "scaling.numerics"    # precision, residual stream, attention kernel and compile of the last attempt (runners.training.step.numerics)

# MLflow's own tags: the experiment's kind (MLflow 3's UI opens "custom_model_development" on its training runs,
# not on a GenAI traces page), and the description shown for an experiment or run
EXPERIMENT_KIND, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"
NOTE = "mlflow.note.content"
PARENT_RUN = "mlflow.parentRunId"    # nests a run under another in the UI (a branch under its trial)

ROLE_SWEEP, ROLE_TRIAL, ROLE_BRANCH = "sweep", "trial", "branch"

PENDING, RUNNING, FINISHED, FAILED, DIVERGED, KILLED, PRUNED = (
    "pending", "running", "finished", "failed", "diverged", "killed", "pruned",
)
STATUSES = (PENDING, RUNNING, FINISHED, FAILED, DIVERGED, KILLED, PRUNED)
DONE = (FINISHED, DIVERGED, PRUNED)  # a re-run sweep trains none of these again

# Params beyond the flattened trial config (which is logged as "model.d_model", "train.lr", ...)
PARAM_N_TOTAL = "N_total"
PARAM_N_NONEMBED = "N_nonembed"
PARAM_N_ACTIVE = "N_active"
PARAM_N_EMBED = "N_embed"
PARAM_E = "E"
PARAM_D = "D"
PARAM_FLOPS_6N = "flops_6N"          # training FLOPs of the whole run, 6 * N_active * D
PARAM_FLOPS_EXACT = "flops_exact"    # training FLOPs of the whole run, exact (attention, head, router)
PARAM_FLOPS_PER_TOKEN_EXACT = "flops_per_token_exact"
PARAM_DATA_HASH = "data_hash"
PARAM_TRIAL_ID = "trial_id"

# Metrics, step = tokens seen
TRAIN_LOSS = "train/loss"            # nats per token, training batch
VAL_LOSS = "val/loss"                # nats per token, fixed validation set
VAL_BPB = "val/bpb"                  # bits per byte, same evaluation
FLOPS = "flops"                      # exact training FLOPs so far
LR = "lr"
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"                     # exact FLOPs/s over the device's peak (GPU only)
EPOCHS = "data/epochs"               # passes over the unique training tokens so far
# Where an attempt's wall time went, logged once as a trial ends (seconds; a pack's members share them): setup
# (model, optimizer, validation batches, resume), the first logged interval of training (torch.compile's
# warm-up), the later training intervals, evaluations, checkpoints (and the tracking store's flush), other
# (what is left: logging, forks' bookkeeping) and total.
TIME_PHASES = ("setup", "first_interval", "train", "eval", "checkpoint", "other", "total")


def time_metric(phase: str) -> str:
    return f"time/{phase}_s"
ROUTER_PREFIX = "router/"            # router/layer{i}/{load_max,load_cv,dropped_frac,balance_loss,z_loss}

# Artifacts on the sweep's parent run
ARTIFACT_DIR = "results"
