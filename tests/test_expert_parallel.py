"""runtime.expert_parallel on two gloo processes (torch.multiprocessing, real process group and all-to-all).

The sharded MoE layer gives the unsharded layer's outputs and gradients (input, router, shared expert, and the
expert weights gathered from the ranks) to 1e-5 in fp32 (of each entry, or of its tensor's largest): with capacity dropping, and with every token routed to
one rank's experts (the other rank gets and sends nothing). A 2-rank trial with its experts sharded, under DDP and
under FSDP, gives the single process's train and validation curves to 1e-5 relative, resuming from its DCP
checkpoint on the same 2 ranks or on 1 process. The validation lines name the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from models import MoEConfig
from runners.data.store import prepare_data
from runners.pipeline import plan
from runners.scheduling.resources import gang_size, member_bytes
from runners.tracking import names
from runners.training.schedule import TrialSetupError
from runners.training.train import check_setup, run_trial
from sweeps.errors import SpecError
from sweeps.spec import load_spec
from sweeps.trial import Resources, Runtime
from tests.conftest import free_port
from tests.helpers import tiny_spec
from tests.test_moe import make_moe, tokens
from tests.test_parallel import RTOL, STEPS, TRIAL_KW, run_job
from tests.test_train import BATCH, DATA, MemorySink, make_trial

WORLD = 2
LAYERS = {  # MoEConfig options of the layer checks: 2 experts a rank, or 4 (granularity 2)
    "capacity": dict(n_experts=4, top_k=2, granularity=2, n_shared=1, capacity_factor=1.0),
    "one-sided": dict(n_experts=4, top_k=2),  # tokens and router made so that every token picks experts 0 and 1
}


def layer_case(name: str, sharded_on=None):
    """The layer of case `name` (the same weights on every rank), the global batch, and a fixed cotangent."""
    layer = make_moe(**LAYERS[name])
    x, probe = tokens(32), tokens(32, seed=2)
    if name == "one-sided":
        x = x.abs()
        with torch.no_grad():
            layer.router.weight[:2] = layer.router.weight[:2].abs()
            layer.router.weight[2:] = -layer.router.weight[2:].abs()
    if sharded_on is not None:
        layer.shard_experts(sharded_on)
    return layer, x, probe


def grads(layer, x, probe) -> dict[str, torch.Tensor]:
    """Output and gradients of sum(output * probe) + aux on `x` (a data-parallel rank's share)."""
    x = x.clone().requires_grad_()
    y, aux, stats = layer(x)
    ((y * probe).sum() + aux).backward()
    local = (lambda t: t.to_local()) if layer.expert_group else (lambda t: t)
    return {"y": y.detach(), "x": x.grad, "router.weight": layer.router.weight.grad,
            "shared": layer.shared.gate_up.weight.grad if layer.shared else torch.zeros(()),
            "w_gate_up": local(layer.w_gate_up.grad), "w_down": local(layer.w_down.grad),
            "dropped": stats["dropped_frac"]}


def layer_rank(rank: int, world: int, root: Path) -> None:
    """Every case of LAYERS on this rank's half of the global batch, sharded over the process group."""
    mesh = init_device_mesh("cpu", (world,))
    for name in LAYERS:
        layer, x, probe = layer_case(name, sharded_on=mesh)
        share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        torch.save(grads(layer, x[share], probe[share]), root / f"{name}.{rank}.pt")


def assert_close(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """RTOL of each entry, or of the tensor's largest entry: a gradient summed over tokens in another order (the
    ranks' and gloo's) moves its small entries by fp32 rounding of the large ones (measured: 1.7e-6 on 20)."""
    torch.testing.assert_close(got, want, rtol=RTOL, atol=max(1e-6, RTOL * float(want.abs().max())), msg=msg)


@pytest.mark.parametrize("name", LAYERS)
def test_the_sharded_layer_gives_the_unsharded_outputs_and_gradients(gang, name):
    """Reference: the unsharded layer on each rank's share of the same global batch (as data parallelism routes
    it), the gradients of the summed loss. Expert weights: rank r's gradient is rows r*E/W.. of the whole."""
    layer, x, probe = layer_case(name)
    ranks = [torch.load(gang[0] / f"{name}.{r}.pt") for r in range(WORLD)]
    halves = [grads(layer, x[s], probe[s]) for s in (slice(0, 16), slice(16, 32))]  # their parameters' .grad
    # is one tensor each, accumulated over both halves: the global batch's gradient, read from the last
    assert [h["dropped"] for h in halves] == [r["dropped"] for r in ranks]
    for key in ("y", "x"):  # each rank's rows
        assert_close(torch.cat([r[key] for r in ranks]), torch.cat([h[key] for h in halves]), f"{name}: {key}")
    for key in ("w_gate_up", "w_down"):  # each rank's experts
        assert_close(torch.cat([r[key] for r in ranks]), halves[1][key], f"{name}: {key}")
    for key in ("router.weight", "shared"):  # data-parallel: each rank's share, summed (and averaged) by the wrapper
        assert_close(sum(r[key] for r in ranks), halves[1][key], f"{name}: {key}")
    if name == "capacity":
        assert all(0 < h["dropped"] < 1 for h in halves)  # capacity did drop assignments
    else:
        assert not ranks[1]["w_down"].any() and ranks[0]["w_down"].any()  # rank 1's experts served nothing


# --- through the trainer -------------------------------------------------------------------------------------


def moe_trial(data):
    """test_parallel's two-block WSD trial with one branch, as an MoE of 4 experts, each token routed to all 4
    (weighted by the router) and each expert serving the first 3/4 of them (capacity drops the rest).

    Why every expert: a top-k choice among the experts is a step function of the weights, and the sharded
    trial sums each expert's gradient in another order (one product over both ranks' rows), so at top_k 2 of 4
    an fp32 rounding difference (1e-7) flips a near-tie after ~40 steps and the curves part by 1e-3 (measured),
    as they would for any change of summation order. With k = E the routing has no choice to flip and the
    drops depend on token order alone: the curve is a smooth function of the weights and 1e-5 holds. The
    layer checks above cover top-k routing, uneven and empty exchanges, exactly."""
    trial = make_trial(data, STEPS, family="moe", **TRIAL_KW)
    moe = MoEConfig(n_experts=4, top_k=4, capacity_factor=0.75)
    return trial.model_copy(update={"model": trial.model.model_copy(update={"n_layers": 2, "moe": moe})})


def runtime(parallel: str = "ddp", expert_parallel: bool = True) -> Runtime:
    return Runtime(device="cpu", checkpoint_every_s=2.0, micro_batch_size=2, parallel=parallel,
                   expert_parallel=expert_parallel)


# name: (parallel, stop at tokens, the folder it trains in): FSDP stopped and resumed on the same 2 ranks, DDP
# stopped for test_a_checkpoint_of_sharded_experts_resumes_on_one_process
JOBS = {"fsdp-stopped": ("fsdp", 30 * BATCH, "fsdp"), "fsdp-resumed": ("fsdp", None, "fsdp"),
        "ddp-stopped": ("ddp", 50 * BATCH, "ddp")}


def rank_main(rank: int, world: int, port: int, cache: str, root: str) -> None:
    """The layer cases, then every job of JOBS, in one process group (one start of the ranks for all)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        layer_rank(rank, world, Path(root))
        data = prepare_data(DATA, Path(cache))
        for job, (parallel, stop_at, folder) in JOBS.items():
            run_job(moe_trial(data), runtime(parallel), stop_at, Path(root) / folder, Path(root) / f"{job}.{rank}.json",
                    data)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    prepare_data(DATA, folder)
    return folder


def one_process(data_dir, workdir: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = prepare_data(DATA, data_dir)
    sink, branch = MemorySink(), MemorySink()
    result = run_trial(moe_trial(data), runtime(expert_parallel=False), workdir, sink, data=data,
                       branch_sinks=lambda _: branch)
    torch.set_num_threads(threads)
    return {"points": sink.points, "final": [result.final_val_loss, result.branches[0].val_loss]}


@pytest.fixture(scope="module")
def gang(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("gang")
    mp.start_processes(rank_main, args=(WORLD, free_port(), str(data_dir), str(root)), nprocs=WORLD,
                       start_method="spawn")
    out = {}
    for job in JOBS:
        ranked = json.loads((root / f"{job}.0.json").read_text())
        ranked["points"] = {k: {int(t): v for t, v in p.items()} for k, p in ranked["points"].items()}
        out[job] = ranked
    return root, out


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    return one_process(data_dir, tmp_path_factory.mktemp("single"))


def same_curve(ranked: dict, single: dict, keys=(names.TRAIN_LOSS, names.VAL_LOSS)) -> None:
    for key in keys:
        assert ranked[key].keys() <= single[key].keys()
        for tokens_seen, value in ranked[key].items():
            assert value == pytest.approx(single[key][tokens_seen], rel=RTOL), (key, tokens_seen)


def test_ddp_with_sharded_experts_gives_the_single_process_curves(gang, single):
    """Every point the DDP gang logged before it was stopped (50 of 60 steps, past the branch)."""
    ranked = gang[1]["ddp-stopped"]["points"]
    assert max(ranked[names.TRAIN_LOSS]) == 49 * BATCH and len(ranked[names.VAL_LOSS]) >= 2
    same_curve(ranked, single["points"])
    assert single["final"][0] < single["points"][names.VAL_LOSS][min(single["points"][names.VAL_LOSS])]  # it learned
    dropped = [v for k, p in single["points"].items() if k.endswith("dropped_frac") for v in p.values()]
    assert dropped and min(dropped) == pytest.approx(0.25)  # capacity 3/4 of the tokens per expert


def test_fsdp_with_sharded_experts_resumes_on_the_same_ranks_on_the_single_process_curves(gang, single):
    """The stopped FSDP gang went on from its checkpoint on the same 2 ranks. The step whose point the stop cut
    off (at 30 steps) is logged with the next one, as their mean."""
    stopped, resumed = gang[1]["fsdp-stopped"], gang[1]["fsdp-resumed"]
    assert stopped["final"] is None and max(stopped["points"][names.TRAIN_LOSS]) == 29 * BATCH
    same_curve(stopped["points"], single["points"])
    train, want = resumed["points"][names.TRAIN_LOSS], single["points"][names.TRAIN_LOSS]
    assert min(train) == 31 * BATCH  # it went on from the checkpoint, not from the start
    assert train.pop(31 * BATCH) == pytest.approx((want[30 * BATCH] + want[31 * BATCH]) / 2, rel=RTOL)
    same_curve(resumed["points"], single["points"])
    assert resumed["final"] == pytest.approx(single["final"], rel=RTOL)


def test_a_checkpoint_of_sharded_experts_resumes_on_one_process(gang, data_dir, single):
    """DCP saved the experts as DTensors sharded on the expert dim: one process loads them whole."""
    workdir = gang[0] / "ddp"
    assert gang[1]["ddp-stopped"]["final"] is None
    assert json.loads((workdir / "checkpoint.json").read_text())["progress"]["step"] >= 40
    resumed = one_process(data_dir, workdir)
    assert resumed["final"] == pytest.approx(single["final"], rel=RTOL)
    assert min(resumed["points"][names.TRAIN_LOSS]) > 40 * BATCH


# --- validation ----------------------------------------------------------------------------------------------


def spec_error(tmp_path, **fields) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(tiny_spec(tmp_path, **fields))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_spec_says_what_expert_parallel_needs(tmp_path):
    moe = {"family": "moe", "moe": {"n_experts": 6, "top_k": 2}}
    assert "model.family has no 'moe'" in spec_error(tmp_path, runtime={"expert_parallel": True},
                                                     resources={"gpus": 2})
    assert "needs a gang; set resources.gpus to W >= 2" in spec_error(
        tmp_path, model=moe, runtime={"expert_parallel": True}, resources={"gpus": 1})
    assert "6 experts (model.moe n_experts * granularity) cannot be shared by 4 ranks" in spec_error(
        tmp_path, model=moe, runtime={"expert_parallel": True}, resources={"gpus": 4})
    load_spec(tiny_spec(tmp_path, model=moe, runtime={"expert_parallel": True}, resources={"gpus": 3}))


def test_gpus_auto_checks_the_experts_where_it_decides_the_gang(tmp_path):
    spec = load_spec(tiny_spec(tmp_path, model={"family": "moe", "moe": {"n_experts": 6, "top_k": 2}},
                               runtime={"expert_parallel": True}, resources={"gpus": "auto"}))
    planned = plan(spec)[0]
    assert gang_size(planned, spec.resources, spec.runtime, gpu_memory_bytes=1 << 40) == 1  # one GPU: all experts
    three_gpus = int(member_bytes(planned, spec.runtime) / 3)  # the trial needs 3 GPUs: a gang of 4
    with pytest.raises(SpecError, match=r"a gang of 4 \(resources.gpus auto\): runtime.expert_parallel: 6 experts"):
        gang_size(planned, spec.resources, spec.runtime, three_gpus)
    assert gang_size(planned, Resources(gpus=2), spec.runtime, None) == 2  # declared: 2 divides 6


def test_a_trial_on_ranks_that_cannot_share_its_experts_is_refused(data_dir):
    data = prepare_data(DATA, data_dir)
    with pytest.raises(TrialSetupError, match="4 experts .* cannot be shared by 8 ranks; use a gang size"):
        check_setup(moe_trial(data), runtime(), data, world=8)  # 8 ranks do share its 8 sequences


def test_the_run_is_tagged_with_whether_its_experts_were_sharded(data_dir):
    from runners.scheduling.worker import group_tags

    trial = moe_trial(prepare_data(DATA, data_dir))
    rank = {names.TAG_WORKER: "host:1", names.TAG_NODE: "n"}
    assert group_tags([rank, rank], runtime(), trial)[names.TAG_EXPERT_PARALLEL] == "true"
    assert group_tags([rank, rank], runtime(expert_parallel=False), trial)[names.TAG_EXPERT_PARALLEL] == "false"
    assert group_tags([rank], runtime(), trial)[names.TAG_EXPERT_PARALLEL] == "false"  # one process: nothing sharded
