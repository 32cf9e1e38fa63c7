"""The sweep spec: what a researcher writes in YAML, validated at the edge.

A spec names a sweep and its axes. Axes are lists; a scalar is a one-value axis. `expand.py` turns a
spec into resolved TrialConfigs (the grid's cross product); nothing here runs anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from models.config import Frozen, MoEConfig
from sweeps.errors import SpecError, one_line
from sweeps.trial import DataConfig, Resources, Runtime, ScheduleConfig, expert_shards

def _as_list(value):
    """Axes are lists; a scalar in YAML is a one-value axis."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Shape(Frozen):
    """An explicit model shape, instead of a target N."""

    d_model: int = Field(ge=8)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    d_ff: int = Field(ge=8)


class DataSpec(DataConfig):
    """The data of every trial; unique_tokens may be a list (an axis) of unique-token budgets."""

    unique_tokens: list[int] | None = Field(
        None, description="cap the distinct training tokens each trial sees (repeated in epochs); a list is an axis"
    )

    @field_validator("unique_tokens", mode="before")
    @classmethod
    def _wrap(cls, v):
        return None if v is None else [int(float(u)) if isinstance(u, (int, float, str)) else u for u in _as_list(v)]

    @field_validator("unique_tokens")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(u < 1 for u in v)):
            raise ValueError("unique_tokens must be positive token counts such as 28e6, or a list of them")
        return v


class ModelSpec(Frozen):
    """Model axes. Target sizes are active non-embedding parameters (= non-embedding for dense)."""

    family: list[Literal["dense", "moe"]] = ["dense"]
    seq_len: int = Field(256, ge=2)
    shape_rule: str = Field("kaplan-aspect", description="a name in models.shapes.SHAPE_RULES")
    tie_embeddings: bool = False
    moe: dict = Field(default_factory=dict, description="MoEConfig fields; a list value is an axis")

    @field_validator("family", mode="before")
    @classmethod
    def _wrap(cls, v):
        return _as_list(v)

    @field_validator("moe")
    @classmethod
    def _moe_fields(cls, value: dict) -> dict:
        for key, axis in value.items():
            if key not in MoEConfig.model_fields:
                raise ValueError(f"unknown MoE option '{key}'; allowed: {', '.join(MoEConfig.model_fields)}")
            for v in _as_list(axis):
                MoEConfig.model_validate({key: v} | ({"n_experts": max(_as_list(v))} if key == "top_k" else {}))
        return value

    def moe_configs(self) -> list[MoEConfig]:
        """The cross product of the MoE axes (one config when no option is a list)."""
        combos: list[dict] = [{}]
        for key, axis in self.moe.items():
            combos = [c | {key: v} for c in combos for v in _as_list(axis)]
        return [MoEConfig(**c) for c in combos]


class IsoFlopGrid(Frozen):
    """Approach 2: at each compute budget, several model sizes, each trained on D = C / flops_per_token(N)."""

    budgets: list[float] = Field(min_length=1, description="training FLOPs of each budget")
    sizes_per_budget: int = Field(5, ge=3, description="model sizes per budget, log-spaced in tokens per parameter")
    tokens_per_param: tuple[float, float] = Field((4.0, 100.0), description="the D/N range the sizes span")
    flops: Literal["6N", "exact"] = Field("6N", description="the convention that turns a budget into D")

    @field_validator("budgets")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(b) or b <= 0 for b in v):
            raise ValueError("budgets must be positive FLOP counts such as 1e12")
        return sorted(v)

    @field_validator("tokens_per_param")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError("tokens_per_param must be [low, high] with 0 < low < high")
        return v


class Grid(Frozen):
    """Either an IsoFLOP grid, or model sizes crossed with token budgets."""

    isoflop: IsoFlopGrid | None = None
    sizes: list[float] = Field(default_factory=list, description="target N values")
    shapes: list[Shape] = Field(default_factory=list, description="explicit shapes instead of target N")
    tokens: list[float] = Field(default_factory=list, description="token budgets D, crossed with the sizes")
    tokens_per_param: list[float] = Field(default_factory=list, description="D = ratio x N, crossed with the sizes")

    @model_validator(mode="after")
    def _one_kind(self) -> Grid:
        models = bool(self.sizes) + bool(self.shapes)
        data = bool(self.tokens) + bool(self.tokens_per_param)
        if self.isoflop is not None:
            if models or data:
                raise ValueError("isoflop chooses sizes and tokens itself; remove sizes/shapes/tokens/tokens_per_param")
            return self
        if models != 1:
            raise ValueError("give exactly one of isoflop, sizes or shapes")
        if data != 1:
            raise ValueError("with sizes or shapes, give exactly one of tokens or tokens_per_param")
        if any(v <= 0 for v in [*self.sizes, *self.tokens, *self.tokens_per_param]):
            raise ValueError("sizes, tokens and tokens_per_param must be positive")
        return self


class TrainSpec(Frozen):
    """Training axes. lr and batch_size take a list (an axis) or 'auto' (from a fitted hparams law)."""

    batch_size: list[int] | Literal["auto"] = Field([4096], description="tokens per step")
    lr: list[float] | Literal["auto"] = [3e-3]
    seeds: list[int] = [0]
    schedule: ScheduleConfig = ScheduleConfig()
    branches_per_run: int = Field(0, ge=0, description="WSD: this many log-spaced decay branches per run")
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)
    eval_points: int = Field(8, ge=1)
    spike_threshold: float = Field(3.0, gt=1.0)

    @field_validator("batch_size", "lr", "seeds", mode="before")
    @classmethod
    def _wrap(cls, v):
        return v if v == "auto" else _as_list(v)

    @model_validator(mode="after")
    def _branches_need_wsd(self) -> TrainSpec:
        if self.branches_per_run and self.schedule.kind != "wsd":
            raise ValueError("branches_per_run needs schedule.kind 'wsd'")
        return self


class FitSpec(Frozen):
    """How the sweep's points become a law."""

    params: Literal["active", "nonembed", "total"] = Field("active", description="which N the fit uses")
    flops: Literal["6N", "exact"] = Field("6N", description="which C the fit uses")
    bootstrap: int = Field(200, ge=0, description="bootstrap replicates for the intervals")


class SearchSpec(Frozen):
    """Optuna search per scale: each grid cell (model and D) gets a study over lr and/or batch size."""

    method: Literal["optuna"] = "optuna"
    trials: int = Field(ge=2, description="Optuna trials per scale")
    lr: tuple[float, float] | None = Field(None, description="[low, high] learning rate, searched in log space")
    batch_size: tuple[int, int] | None = Field(None, description="[low, high] tokens per step, log space, whole sequences")
    sampler: Literal["tpe", "random", "qmc"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="on intermediate validation loss")
    parallel: int = Field(4, ge=1, description="trials of one study in flight at once (TPE learns between them)")
    storage: str | None = Field(None, description="Optuna RDB URL; default sqlite file beside the checkpoints")

    @model_validator(mode="after")
    def _something_to_search(self) -> SearchSpec:
        if self.lr is None and self.batch_size is None:
            raise ValueError("search needs a range for lr, batch_size or both, e.g. lr: [1e-4, 1e-2]")
        for name, r in (("lr", self.lr), ("batch_size", self.batch_size)):
            if r is not None and not 0 < r[0] < r[1]:
                raise ValueError(f"search.{name} must be [low, high] with 0 < low < high")
        return self


class SweepSpec(Frozen):
    """The whole spec file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="letters, digits, '.', '_', '-'")
    description: str = ""
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    grid: Grid
    train: TrainSpec = TrainSpec()
    search: SearchSpec | None = Field(None, description="search lr/batch per scale with Optuna instead of a grid")
    fit: FitSpec = FitSpec()
    hparams_law: Path | None = Field(None, description="law.json whose hparams give lr/batch_size 'auto'")
    resources: Resources = Resources()
    runtime: Runtime = Runtime()
    checkpoint_dir: Path = Field(Path(".scaling/checkpoints"), description="a path every Ray node can reach")
    results_dir: Path = Field(Path("results"), description="results/<name>/ gets points, law and plots")

    @model_validator(mode="after")
    def _auto_needs_law(self) -> SweepSpec:
        if "auto" in (self.train.lr, self.train.batch_size) and self.hparams_law is None:
            raise ValueError("lr or batch_size 'auto' needs hparams_law: a law.json with fitted hparams")
        if self.search is not None:
            for knob in ("lr", "batch_size"):
                axis = getattr(self.train, knob)
                if axis == "auto":
                    raise ValueError(f"train.{knob} 'auto' does not mix with search; give one value or search it")
                if getattr(self.search, knob) is not None and len(axis) > 1:
                    raise ValueError(f"train.{knob} is an axis and search.{knob} searches it too; keep one")
        if "moe" not in self.model.family and self.model.moe:
            raise ValueError("model.moe is set but model.family has no 'moe'")
        return self

    @model_validator(mode="after")
    def _expert_parallel_fits(self) -> SweepSpec:
        """What can be checked before W is known per trial (resources.gpus 'auto': runners.scheduling.resources)."""
        if not self.runtime.expert_parallel:
            return self
        if "moe" not in self.model.family:
            raise ValueError("runtime.expert_parallel shards MoE experts but model.family has no 'moe'; add it or "
                             "set expert_parallel false")
        if self.resources.workers < 2 and self.resources.gpus != "auto":
            raise ValueError(f"runtime.expert_parallel needs a gang; set resources.gpus to W >= 2 (now "
                             f"{self.resources.gpus}) or expert_parallel false")
        for moe in self.model.moe_configs():
            expert_shards(moe, self.runtime, self.resources.workers)
        return self


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec; every problem becomes a one-line SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping with at least 'name' and 'grid'")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise one_line(e, SweepSpec, source=str(path)) from None
    return spec
