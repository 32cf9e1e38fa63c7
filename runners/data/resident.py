"""A corpus's training tokens held in the GPU's memory (issue 19), so that a step's batches are gathered there.

A step's batch is a function of its window numbers (runners.data.store): gathered on the host, every step copies
its tokens (8 bytes each) through a freshly pinned buffer, and for a pack of 64 small members that took longer than
the step itself. With the tokens resident, only the window numbers cross (8 bytes a sequence) and the gather is one
indexing kernel. The tokens are the same either way (tests/test_data.py).
"""

from __future__ import annotations

import numpy as np
import torch

from runners.data.store import TokenData

MAX_MEMORY_SHARE = 0.02  # of the GPU's memory (a copy per trial process); above it, batches gather on the host


class TrainTokens:
    """`batch(windows, seq_len)`: the tokens of training windows (numpy indices of any shape) as int64
    [..., seq_len + 1] on `device`, as TokenData.gather reads them."""

    def __init__(self, data: TokenData, device: torch.device, resident: bool | None = None):
        """`resident`: hold the tokens on `device` (int32); default: on a GPU where they fit MAX_MEMORY_SHARE."""
        self.data, self.device = data, device
        if resident is None:
            resident = device.type == "cuda" and (
                4 * len(data.train) <= MAX_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)
        self.tokens = torch.from_numpy(np.asarray(data.train).astype(np.int32)).to(device) if resident else None

    def batch(self, windows: np.ndarray, seq_len: int) -> torch.Tensor:
        if self.tokens is None:
            return self._to_device(torch.from_numpy(self.data.gather(windows, seq_len)))
        windows = self._to_device(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64)))
        offsets = torch.arange(seq_len + 1, device=self.device)
        return self.tokens[windows[..., None] * (seq_len + 1) + offsets].long()

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned: a copy that does not wait for the GPU
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)
