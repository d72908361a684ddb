"""Training cost counted in floating-point operations, so that cost comparisons do not depend on the machine's load.

The trainer counts the FLOPs of one real training step (every forward and backward pass of the student, the
teacher's passes and the attack's steps) with torch's :class:`~torch.utils.flop_counter.FlopCounterMode`, divides by
the images in that batch and multiplies by the images each epoch sees. Only matrix products and convolutions are
counted (torch's registry); element-wise work is left out, as in the literature's FLOP counts.
"""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


class _NoModules:
    """A stand-in for FlopCounterMode's per-module tracker: every count goes to "Global".

    The tracker's backward hooks break ``torch.autograd.grad`` on a leaf input (every attack's input gradient) in
    torch 2.14, and the per-module split is not needed here.
    """

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


class FlopCounter(FlopCounterMode):
    """Counts the FLOPs of everything run inside it, attacks' input gradients included."""

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _NoModules()
