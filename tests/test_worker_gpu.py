"""Which GPU a trial's worker trains on, and when a worker may be kept for the next trial."""

from __future__ import annotations

import pytest

from runners.scheduling.sweep import reuses_workers
from runners.scheduling.worker import NOSET_CUDA, cuda_index


@pytest.mark.parametrize("gpu_id,visible,index", [("2", "0,1,2,3", 2), ("2", "2,3", 0), ("3", "2, 3", 1), (1, None, 1), ("0", "", 0)])
def test_the_assigned_gpu_is_found_among_the_visible_ones(gpu_id, visible, index):
    assert cuda_index(gpu_id, visible) == index


def test_a_gpu_outside_the_visible_ones_is_an_error():
    with pytest.raises(ValueError):
        cuda_index("5", "0,1")


def test_workers_are_kept_on_cpu_and_on_gpus_only_where_they_see_every_gpu(monkeypatch):
    monkeypatch.delenv(NOSET_CUDA, raising=False)
    assert reuses_workers(cluster_has_gpus=False) and not reuses_workers(cluster_has_gpus=True)
    monkeypatch.setenv(NOSET_CUDA, "1")
    assert reuses_workers(cluster_has_gpus=True)


def test_trials_run_in_the_workers_warmed_for_them(monkeypatch, sqlite_uri):
    """A warm-up holds a sliver of a GPU so that Ray hands its worker to GPU trials (it keeps workers that held
    a GPU apart from the others); as many warm-ups as trials fit at once (here 2 CPUs, 3 trials)."""
    import os

    import ray

    from runners.scheduling.sweep import warm_workers
    from runners.tracking.runs import client

    client(sqlite_uri).search_experiments()  # the store exists before any worker opens it, as in a sweep
    monkeypatch.setenv(NOSET_CUDA, "1")
    ray.shutdown()  # a Ray without GPUs may be up from other tests
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        options = {"num_cpus": 1, "num_gpus": 0.25}
        warmed = set(ray.get(warm_workers([options] * 3, sqlite_uri)))
        assert len(warmed) == 2

        def pid() -> int:
            return os.getpid()

        trial = ray.remote(max_calls=0)(pid).options(**options)
        assert set(ray.get([trial.remote() for _ in range(4)])) <= warmed
    finally:
        ray.shutdown()
