"""The points table: the one contract between whatever produced losses and every fitter.

One row per evaluation point. The harness writes it from MLflow (runners/tracking/collect.py); anyone can
write it by hand from published numbers. Only N, D and loss are required.

Conventions (recorded in every law file):
  N     parameters, by default active non-embedding (= non-embedding for dense); N_total,
        N_nonembed and N_active keep all three so a fit can switch with --params.
  D     training tokens seen at this point.
  C     training FLOPs at this point, by default exact (attention and head included; forward +
        backward = 3x forward); C_6N and C_exact keep both so a fit can switch with --flops.
  loss  validation cross-entropy in nats per token; bpb is the same in bits per byte.
"""

REQUIRED = ("N", "D", "loss")

# Columns the harness fills; a hand-made table may hold any subset beyond REQUIRED.
OPTIONAL = (
    "C",             # FLOPs under the table's convention (see above)
    "E",             # routed experts; 1 for dense
    "trial_id",      # the trial (or WSD branch) the point belongs to
    "parent_trial_id",  # for a WSD branch: the trial it forked from; else empty
    "family",        # dense | moe
    "budget",        # IsoFLOP budget the trial was planned for (FLOPs), if any
    "final",         # True for the last point of a trial or branch: the only rows parametric fits use
    "step",          # optimizer step of the point
    "tokens",        # tokens seen (= D for that row)
    "seed",
    "lr",
    "batch_size",    # tokens per optimizer step
    "bpb",           # validation bits per byte
    "N_total",
    "N_nonembed",
    "N_active",
    "C_6N",
    "C_exact",
    "status",        # finished | diverged | pruned | failed | killed
    "unique_tokens",  # distinct training tokens the trial drew from (data.unique_tokens, else the whole split)
    "epochs",        # passes over them at this point: D / unique_tokens (> 1: some tokens were seen again)
)

COLUMNS = REQUIRED + OPTIONAL
