"""Summary statistics the reports use, in one place so every table computes them the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rrm.errors import RRMError


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its ``confidence`` interval from Student's t (0 for a single value).

    The paper reports per-epoch time as mean +- 95% CI; the half-width is in the same units as the mean.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    from scipy import stats  # imported when used: scipy.stats takes ~0.8 s, paid once per run at its end

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)


def epoch_time_stats(epoch_seconds: Sequence[float], replays: int = 1) -> dict:
    """Per-epoch wall time as mean +- 95% CI (Student's t) and the total, as the paper reports training cost.

    Free AT replays each minibatch ``replays`` times and the paper counts one pass over the data as ``replays``
    epochs (12 passes x 8 = "96 epochs"). So each recorded pass counts as ``replays`` epochs of ``pass / replays``
    seconds, the interval is computed over the passes (the independent measurements, not ``replays`` copies of each,
    which would shrink it for nothing) and the total is the sum of the passes, which equals ``mean x epochs``.
    """
    if replays < 1:
        raise RRMError(f"replays must be >= 1, got {replays}")
    if not epoch_seconds:
        raise RRMError("no epoch times recorded; train at least one epoch first")
    if any(not (s >= 0 and math.isfinite(s)) for s in epoch_seconds):
        raise RRMError(f"epoch times must be finite and >= 0 seconds, got {list(epoch_seconds)}")
    mean, half_width = mean_ci([s / replays for s in epoch_seconds])
    total = math.fsum(epoch_seconds)
    return {
        "epochs": len(epoch_seconds) * replays,
        "passes": len(epoch_seconds),
        "replays": replays,
        "epoch_seconds_mean": mean,
        "epoch_seconds_ci95": half_width,
        "total_seconds": total,
        "total_minutes": total / 60,
    }
