"""Training cost counted in floating-point operations, so that cost comparisons do not depend on the machine's load.

The trainer counts the FLOPs of one real training step (every forward and backward pass of the student, the
teacher's passes and the attack's steps) with torch's :class:`~torch.utils.flop_counter.FlopCounterMode`, divides by
the images in that batch and multiplies by the images each epoch sees. Only matrix products and convolutions are
counted (torch's registry); element-wise work is left out, as in the literature's FLOP counts.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop


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


def grouped_conv_backward_flop(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups,
    output_mask, out_shape, **kwargs,
) -> int:  # fmt: skip
    """torch's count for a convolution's backward pass, with the weight gradient of a grouped convolution divided by
    its groups: torch 2.14 counts that term as if the convolution were ungrouped (a depthwise convolution's weight
    gradient came out ``channels`` times too large, ConvMixer's backward pass 11x its true cost)."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
    grad_weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    return grad_input + grad_weight // groups


class FlopCounter(FlopCounterMode):
    """Counts the FLOPs of everything run inside it, attacks' input gradients included."""

    def __init__(self):
        grouped = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
        super().__init__(display=False, custom_mapping=grouped)
        self.mod_tracker = _NoModules()
