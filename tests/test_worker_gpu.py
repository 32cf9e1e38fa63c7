"""Which GPU a trial's worker trains on, and when a worker may be kept for the next trial."""

from __future__ import annotations

import pytest

from runners.sweep import reuses_workers
from runners.worker import NOSET_CUDA, cuda_index


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
