"""The spec schema: good specs load, bad ones give one line naming the field, the value and the fix."""

from pathlib import Path

import pytest
import yaml

from sweeps.errors import SpecError
from sweeps.spec import load_spec
from sweeps.trial import Runtime

BYTE_VOCAB = 257  # byte-level tokens: 256 bytes and the end-of-document id
EXAMPLES = sorted((Path(__file__).parents[1] / "sweeps" / "examples").glob("*.yaml"))


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def base() -> dict:
    return {"name": "t", "grid": {"sizes": [2e4, 4e4], "tokens": [1e5]}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path):
    assert load_spec(path).name


def test_scalars_become_axes(tmp_path):
    spec = load_spec(write(tmp_path, base() | {"train": {"lr": 1e-3, "batch_size": 1024, "seeds": 3}}))
    assert (spec.train.lr, spec.train.batch_size, spec.train.seeds) == ([1e-3], [1024], [3])


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"trian": {}}, "unknown key 'trian'; did you mean 'train'?"),
        ({"train": {"lrr": 1e-3}}, "unknown key 'train.lrr'; did you mean 'lr'?"),
        ({"train": {"lr": "fast"}}, "train.lr[0] = 'fast': Input should be a valid number"),
        ({"train": {"schedule": {"kind": "linear"}}}, "train.schedule.kind = 'linear': Input should be 'cosine', 'constant' or 'wsd'"),
        ({"grid": {"isoflop": {"budgets": [1e12]}, "sizes": [1e4]}}, "isoflop chooses sizes and tokens itself"),
        ({"grid": {"sizes": [1e4]}}, "give exactly one of tokens or tokens_per_param"),
        ({"grid": {"isoflop": {"budgets": [-1.0]}}}, "grid.isoflop.budgets = [-1.0]: budgets must be positive"),
        ({"name": "a b"}, "name = 'a b'"),
        ({"train": {"lr": "auto"}}, "needs hparams_law"),
        ({"data": {"tokenizer": "bpe"}}, "tokenizer 'bpe' needs vocab_size"),
        ({"model": {"moe": {"n_experts": 4}}}, "model.family has no 'moe'"),
        ({"model": {"family": "moe", "moe": {"n_expert": 4}}}, "unknown MoE option 'n_expert'"),
        ({"data": {"unique_tokens": [1e6, -5]}}, "unique_tokens must be positive token counts"),
        ({"runtime": {"pack": "on"}}, "runtime.pack = 'on': Input should be 'auto' or 'off'"),
        ({"runtime": {"max_pack": 0}}, "runtime.max_pack = 0: Input should be greater than or equal to 1"),
        ({"resources": {"gpus": 2.5}}, "gpus 2.5: above 1 a trial takes whole GPUs (a gang of workers); use 2 or 3"),
        ({"runtime": {"parallel": "tp"}}, "runtime.parallel = 'tp': Input should be 'ddp' or 'fsdp'"),
        ({"runtime": {"expert_parallel": True}}, "runtime.expert_parallel shards MoE experts but model.family has no 'moe'"),
    ],
)
def test_bad_specs_give_one_line(tmp_path, change, expected):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, base() | change))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_gang_size_declared_or_from_memory(tmp_path):
    """gpus W >= 2 is a gang of W; 'auto' is one process while one GPU holds the trial, else the fewest GPUs (a
    power of two) whose shards hold it."""
    from models import estimate_memory_bytes
    from runners.pipeline import plan
    from runners.scheduling.resources import HEADROOM, gang_size, micro_batch_seqs

    spec = load_spec(write(tmp_path, base() | {"data": {"max_bytes": 100_000}}))
    planned = plan(spec)[0]
    need = HEADROOM * estimate_memory_bytes(planned.trial.model, micro_batch_seqs(planned, spec.runtime))
    declared = spec.resources.model_copy(update={"gpus": 4})
    assert gang_size(planned, declared, spec.runtime, None) == 4
    assert gang_size(planned, spec.resources, spec.runtime, None) == 1  # auto without GPUs: one process
    assert gang_size(planned, spec.resources, spec.runtime, int(need * 1.01)) == 1
    assert gang_size(planned, spec.resources, spec.runtime, int(need / 1.5)) == 2
    assert gang_size(planned, spec.resources, spec.runtime, int(need / 3.5)) == 4


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("search, train, message", [
    ({"trials": 4}, {}, "search needs a range for lr, batch_size or both"),
    ({"trials": 4, "lr": [1e-2, 1e-3]}, {}, "search.lr must be [low, high] with 0 < low < high"),
    ({"trials": 4, "lr": [1e-3, 1e-2]}, {"lr": [1e-3, 3e-3]}, "train.lr is an axis and search.lr searches it too"),
])
def test_bad_search_is_one_line(tmp_path, search, train, message):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, base() | {"search": search, "train": train}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_readmes_full_spec_is_valid_and_shows_the_runtime_defaults(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```yaml\nname: my-sweep", 1)[1].split("```", 1)[0]
    path = tmp_path / "readme.yaml"
    path.write_text("name: my-sweep" + block)
    spec = load_spec(path)
    assert spec.runtime == Runtime()


def test_unique_tokens_is_an_axis_in_whole_sequences_and_trials_without_it_keep_their_ids(tmp_path):
    """The quickstart's committed trial ids, recomputed from its committed spec (the corpus hash from its law
    file): a field added to the trial must not rename trials that do not set it."""
    import json

    import pandas as pd

    from sweeps.expand import expand

    quickstart = Path(__file__).parents[1] / "results" / "quickstart"
    spec = load_spec(quickstart / "spec.yaml")
    corpus = json.loads((quickstart / "law.json").read_text())["meta"]["data_content_hash"]
    points = pd.read_csv(quickstart / "points.csv")
    committed = set(points.loc[points["parent_trial_id"].isna(), "trial_id"])
    plain = expand(spec, vocab_size=BYTE_VOCAB, content_hash=corpus)
    assert {p.trial_id for p in plain} == committed

    raw = yaml.safe_load((quickstart / "spec.yaml").read_text())
    raw["data"]["unique_tokens"] = ["1e5", 300000]
    capped = expand(load_spec(write(tmp_path, raw)), vocab_size=BYTE_VOCAB, content_hash=corpus)
    seq = spec.model.seq_len
    assert len(capped) == 2 * len(plain) and not {p.trial_id for p in capped} & committed
    assert sorted({p.trial.data.unique_tokens for p in capped}) == [round(1e5 / seq) * seq, round(3e5 / seq) * seq]


def test_a_bare_yaml_off_turns_packs_off(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: t\ngrid: {sizes: [2e4], tokens: [1e5]}\nruntime: {pack: off}\n")  # YAML reads off as false
    assert load_spec(path).runtime.pack == "off"
