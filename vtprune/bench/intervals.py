"""Bootstrap intervals over questions: how much a bench cell would move on another draw of the same number of
questions."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], resamples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic`` over the columns (questions) of ``values`` [k, n].

    The columns are resampled jointly for all k rows, so a statistic that compares rows (retention: a configuration's
    accuracy over the unpruned one's, on the same questions) gets the paired interval. ``statistic`` maps
    [k, resamples, n] to [resamples]; returns [low, high], or None with no questions or ``resamples`` = 0.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    if n == 0 or resamples <= 0:
        return None
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws = np.asarray(statistic(values[:, picks]), dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return [float(low), float(high)]
