"""Peak memory of a block of code: CUDA's allocator on GPU; the process's peak RSS on Linux CPU."""
from __future__ import annotations

from pathlib import Path

import torch


def _rss_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """``peak_mb``: memory the block needed above what was in use when it started.

    On CPU this resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reads ``VmHWM``; memory the
    allocator kept from earlier work can be reused without raising RSS, so this is a lower bound. ``None`` where
    neither source exists.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self._start = _rss_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self._start is not None:
            peak = _rss_kb("VmHWM")
            self.peak_mb = None if peak is None else max(0, peak - self._start) / 1024
