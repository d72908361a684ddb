"""Stem transplant: copy a robust teacher's first layer into a student whose first layer has the same shape.

On MNIST most of a robust model's robustness sits in its first-layer thresholds, which clean feature matching never
exercises (see docs/studies.md); copying the stem moves them across architectures. A BatchNorm on either side is
folded: the teacher's stem becomes one affine convolution ``w * x + b``, which the student's stem reproduces exactly
(its BatchNorm, if any, set to pass ``b`` through: running mean 0, variance 1 - eps, weight 1, bias b).
"""

from __future__ import annotations

import torch
from torch import nn

from rrm.errors import RRMError
from rrm.models.base import Classifier

# stem: the teacher's first layer whole; stem-filters: the k filters the teacher's next layer reads most, for a student
# whose first layer has k <= the teacher's filters and otherwise the same shape.
TRANSPLANTS = ("stem", "stem-filters")


def stem_layers(model: Classifier) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The first convolution of ``model`` and the BatchNorm that follows it, if any."""
    layers = list(model.body) if isinstance(model.body, nn.Sequential) else []
    if not layers or not isinstance(layers[0], nn.Conv2d):
        raise RRMError(
            f"model {model.spec.get('name')!r} does not start with a convolution; its stem cannot be transplanted"
        )
    bn = layers[1] if len(layers) > 1 and isinstance(layers[1], nn.BatchNorm2d) else None
    return layers[0], bn


def folded_stem(model: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
    """The stem as one affine convolution ``(weight, bias)``, its BatchNorm (in eval mode) folded in."""
    conv, bn = stem_layers(model)
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, device=weight.device)
    if bn is not None:
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = (bias - bn.running_mean) * scale + bn.bias.detach()
    return weight, bias


def most_read_filters(model: Classifier, k: int) -> torch.Tensor:
    """The ``k`` stem filters that ``model``'s next convolution weighs most (L2 norm of its weights over each input
    channel), in ascending order of index."""
    conv, _ = stem_layers(model)
    following = [m for m in model.body.modules() if isinstance(m, nn.Conv2d) and m is not conv]
    if not following or following[0].in_channels != conv.out_channels:
        raise RRMError(
            f"model {model.spec.get('name')!r} has no convolution reading its stem; transplant the whole stem"
        )
    weight = following[0].weight.detach()
    norms = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norms.topk(k).indices.sort().values


def _shape(conv: nn.Conv2d) -> dict:
    return {
        "channels": (conv.in_channels, conv.out_channels),
        "kernel": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
    }


def _keep_eval(module: nn.Module, args) -> None:
    module.training = False  # a frozen BatchNorm normalises with its (transplanted) running statistics


def transplant_stem(
    teacher: Classifier, student: Classifier, frozen: bool = True, filters: bool = False
) -> torch.Tensor:
    """Copy the teacher's stem into ``student`` in place; ``frozen``: it is not trained further (BatchNorm in eval).
    ``filters``: a student stem with fewer filters takes the teacher's most-read ones (:func:`most_read_filters`).

    Returns the indices of the teacher's filters copied, in the student's order. Raises :class:`RRMError` naming what
    differs when the student's stem cannot take the teacher's.
    """
    t_conv, _ = stem_layers(teacher)
    s_conv, s_bn = stem_layers(student)
    t_shape, s_shape = _shape(t_conv), _shape(s_conv)
    (t_in, t_out), (s_in, s_out) = t_shape["channels"], s_shape["channels"]
    if filters and t_in == s_in and s_out <= t_out:
        t_shape["channels"] = s_shape["channels"]  # fewer filters are what stem-filters is for
    differs = [key for key in t_shape if t_shape[key] != s_shape[key]]
    if differs:
        what = "; ".join(f"{key} {t_shape[key]} in the teacher, {s_shape[key]} in the student" for key in differs)
        fewer = not filters and s_in == t_in and s_out < t_out and list(differs) == ["channels"]
        raise RRMError(
            f"cannot transplant the teacher's stem ({teacher.spec.get('name')!r}) into "
            f"{student.spec.get('name')!r}: {what}; use a student whose first layer has the same shape, "
            + ("copy the teacher's most-read filters (--transplant stem-filters), " if fewer else "")
            + "or match the stem instead (--match-layers stem,penultimate)"
        )
    if (teacher.spec.get("mean"), teacher.spec.get("std")) != (student.spec.get("mean"), student.spec.get("std")):
        raise RRMError("the teacher and the student normalise their inputs differently; train both on one dataset")
    if s_bn is None and s_conv.bias is None:
        raise RRMError(
            f"the stem of {student.spec.get('name')!r} has neither a bias nor a BatchNorm to carry the "
            "teacher's thresholds; use another student"
        )
    weight, bias = folded_stem(teacher)
    index = most_read_filters(teacher, s_out) if s_out < t_out else torch.arange(t_out)
    weight, bias = weight[index.to(weight.device)], bias[index.to(bias.device)]
    with torch.no_grad():
        s_conv.weight.copy_(weight)
        if s_bn is None:
            s_conv.bias.copy_(bias)
        else:
            if s_conv.bias is not None:
                s_conv.bias.zero_()
            s_bn.running_mean.zero_()
            s_bn.running_var.fill_(1 - s_bn.eps)
            s_bn.weight.fill_(1.0)
            s_bn.bias.copy_(bias)
    if frozen:
        for layer in (s_conv, s_bn):
            if layer is not None:
                layer.requires_grad_(False)
        if s_bn is not None:
            s_bn.register_forward_pre_hook(_keep_eval)
    return index
