"""Catastrophic overfitting (Wong et al. 2020): a single-step method learns to beat single-step attacks and suddenly
loses its robustness to multi-step ones. The trainer watches the per-epoch monitor for it."""

from __future__ import annotations

# PGD accuracy this far (absolute) below its best so far counts as a collapse; Wong et al. stopped at a 0.2 drop.
COLLAPSE_DROP = 0.2
# Single-step accuracy that fell by no more than this "held".
HOLD_TOLERANCE = 0.02


def collapse_epoch(history: list[dict], drop: float = COLLAPSE_DROP, tolerance: float = HOLD_TOLERANCE) -> int | None:
    """The first epoch whose PGD accuracy (``monitor_robust_accuracy``) fell ``drop`` below its best so far while
    single-step accuracy (``monitor_fgsm_accuracy``) held or rose against the epoch before; None if none did."""
    best = previous_single = None
    for record in history:
        multi, single = record.get("monitor_robust_accuracy"), record.get("monitor_fgsm_accuracy")
        if multi is None or single is None:
            continue
        if best is not None and best - multi >= drop and single >= previous_single - tolerance:
            return int(record["epoch"])
        best = multi if best is None else max(best, multi)
        previous_single = single
    return None
