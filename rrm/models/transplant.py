"""Stem transfer: a robust teacher's first layer in a student of another architecture.

On MNIST most of a robust model's robustness sits in its first-layer thresholds, which clean feature matching never
exercises (see notebook/studies.md); moving the teacher's first layer ("stem") moves them across architectures. A
BatchNorm on either side is folded: the teacher's stem becomes one affine convolution ``w * x + b``.

- ``stem``: the student's first layer has the teacher's shape and takes its weights (its BatchNorm, if any, set to
  pass ``b`` through: running mean 0, variance 1 - eps, weight 1, bias b).
- ``stem-filters``: a student stem with fewer filters takes the ones the teacher's next layer reads most.
- ``stem-prefix``: any student whose model starts with a convolution. The teacher's stem and its ReLU run in front of
  the student, and the student's own first layer (its kernel, stride and filters kept) reads the teacher's maps in
  place of the pixels: a trained adapter from the teacher's thresholded maps into the student's own layers.
- ``stem-adapter``: any student, its architecture whole. The teacher's stem and its ReLU run in front, and a trained
  1x1 convolution narrows its maps to the image's channels, which the student's first layer reads as it would the
  pixels. It costs less than ``stem-prefix``, whose first layer reads every map (63-90% of its FLOPs in the transfer
  study).
- ``auto``: ``stem`` where the shapes match, else ``stem-adapter``; :func:`choose_transplant` says why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rrm.errors import RRMError
from rrm.models.base import Classifier

# auto: chosen for the pair (choose_transplant); stem: the teacher's first layer whole; stem-filters: the k filters the
# teacher's next layer reads most, for a student whose first layer has k <= the teacher's filters and otherwise the same
# shape; stem-prefix: the teacher's first layer in front of the student's, which reads its maps; stem-adapter: the same
# prefix narrowed by a trained 1x1 convolution to the image's channels, in front of the student as built.
TRANSPLANTS = ("auto", "stem", "stem-filters", "stem-prefix", "stem-adapter")


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


def _check_normalisation(teacher: Classifier, student: Classifier) -> None:
    """The teacher's stem reads normalised pixels: the student must normalise them the same way."""
    if (teacher.spec.get("mean"), teacher.spec.get("std")) != (student.spec.get("mean"), student.spec.get("std")):
        raise RRMError("the teacher and the student normalise their inputs differently; train both on one dataset")


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
            + "or let --transplant auto run the teacher's first layer in front of the student's (stem-prefix)"
        )
    _check_normalisation(teacher, student)
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


def describe_stem(conv: nn.Conv2d) -> str:
    """``32 3x3 filters`` or ``128 4x4 filters, stride 4``: a first layer's shape in words."""
    kernel = "x".join(map(str, conv.kernel_size))
    stride = "" if conv.stride == (1, 1) else f", stride {'x'.join(map(str, dict.fromkeys(conv.stride)))}"
    return f"{conv.out_channels} {kernel} filters{stride}"


def prefix_problems(teacher: Classifier) -> list[str]:
    """Why the teacher's stem cannot run in front of another model (empty where it can): it must keep the image's
    resolution (stride 1, "same" padding), so that the student's own first layer sees the image size it was built for,
    and be followed by a ReLU (after its BatchNorm, if any), whose thresholds are what the prefix carries."""
    conv, bn = stem_layers(teacher)
    layers = list(teacher.body)
    after = 2 if bn is not None else 1
    problems = []
    if conv.stride != (1, 1):
        problems.append(f"its stride is {conv.stride[0]}, not 1")
    if any(p != d * (k - 1) // 2 or k % 2 == 0 for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation)):
        problems.append("its padding changes the image size")
    if conv.groups != 1:
        problems.append(f"it is grouped ({conv.groups} groups)")
    if len(layers) <= after or not isinstance(layers[after], nn.ReLU):
        problems.append("no ReLU follows it")
    return problems


_PREFIX_FIX = (
    "use a teacher whose first layer is a stride-1 convolution with 'same' padding and a ReLU (cnn, cnn-bn, resnet8, "
    "resnet20, vgg), or a student with its first layer's shape (--transplant stem)"
)


def stem_prefix_spec(teacher: Classifier, adapter: int | None = None) -> dict:
    """The shape of the teacher's stem as a prefix of a student (``build_model(stem_prefix=...)``); ``adapter``: a 1x1
    convolution narrows its maps to that many channels, which the student reads as built (``stem-adapter``). Raises
    :class:`RRMError` with :func:`prefix_problems` where the stem cannot be a prefix."""
    conv, _ = stem_layers(teacher)
    problems = prefix_problems(teacher)
    if problems:
        raise RRMError(
            f"the first layer of teacher {teacher.spec.get('name')!r} ({describe_stem(conv)}) cannot run in front of "
            f"a student: {'; '.join(problems)}; {_PREFIX_FIX}"
        )
    spec = {
        "channels": conv.out_channels,
        "kernel": list(conv.kernel_size),
        "padding": list(conv.padding),
        "dilation": list(conv.dilation),
    }
    if adapter is not None:  # only where set: the specs of stem-prefix students stay as they were
        spec["adapter"] = adapter
    return spec


def prefixed_body(body: nn.Module, in_channels: int, prefix: dict) -> nn.Sequential:
    """``body`` with a stem of shape ``prefix`` (:func:`stem_prefix_spec`) and a ReLU in front: with an ``adapter``,
    a 1x1 convolution narrows the stem's maps to the ``in_channels`` that ``body`` reads as built; without one,
    ``body``'s first convolution is rebuilt to read the stem's ``channels`` maps (same filters, kernel, stride and
    padding)."""
    stem = nn.Conv2d(
        in_channels, prefix["channels"], tuple(prefix["kernel"]), padding=tuple(prefix["padding"]),
        dilation=tuple(prefix["dilation"]),
    )  # fmt: skip
    if prefix.get("adapter"):
        if prefix["adapter"] != in_channels:
            raise RRMError(
                f"a stem adapter narrows the teacher's maps to the image's channel count ({in_channels}), not to "
                f"{prefix['adapter']}; rebuild the student with the image's channels"
            )
        adapter = nn.Conv2d(prefix["channels"], in_channels, 1)
        return nn.Sequential(
            stem, nn.ReLU(inplace=True), adapter, *(body if isinstance(body, nn.Sequential) else [body])
        )
    layers = list(body) if isinstance(body, nn.Sequential) else []
    first = layers[0] if layers else None
    if not isinstance(first, nn.Conv2d) or first.groups != 1:
        raise RRMError(
            "a student takes the teacher's first layer as a prefix only where its model starts with an ungrouped "
            "convolution; choose such a student (cnn, cnn-bn, resnet8, resnet20, vgg, convmixer) or --transplant "
            "stem-adapter, which takes any student"
        )
    reader = nn.Conv2d(
        prefix["channels"], first.out_channels, first.kernel_size, first.stride, first.padding, first.dilation,
        bias=first.bias is not None,
    )  # fmt: skip
    return nn.Sequential(stem, nn.ReLU(inplace=True), reader, *layers[1:])


def transplant_prefix(teacher: Classifier, student: Classifier, frozen: bool = True) -> None:
    """Copy the teacher's stem (BatchNorm folded) into the prefix of ``student`` (built with ``stem_prefix``)."""
    if not student.spec.get("stem_prefix"):
        raise RRMError(f"student {student.spec.get('name')!r} has no stem prefix; build it with stem_prefix")
    _check_normalisation(teacher, student)
    weight, bias = folded_stem(teacher)
    stem = student.body[0]
    with torch.no_grad():
        stem.weight.copy_(weight)
        stem.bias.copy_(bias)
    stem.requires_grad_(not frozen)


def choose_transplant(requested: str, teacher: Classifier, student: Classifier) -> tuple[str, str]:
    """The transplant to run for this pair, and why in one line. ``auto`` picks ``stem`` where the student's first
    layer has the teacher's shape and ``stem-adapter`` otherwise (any student; in the transfer study it cost less than
    ``stem-prefix`` and kept as much robustness or more); an explicit choice is checked here, before training.

    Raises :class:`RRMError` naming what differs and what would work where no transplant fits the pair.
    """
    if requested not in TRANSPLANTS:
        raise RRMError(f"unknown transplant {requested!r}; choose one of {', '.join(TRANSPLANTS)}")
    t_conv, _ = stem_layers(teacher)
    teacher_stem = describe_stem(t_conv)
    try:
        s_conv, s_bn = stem_layers(student)
    except RRMError:
        if requested not in ("auto", "stem-adapter"):  # the adapter takes a student whatever its first layer
            raise
        s_conv, s_bn = None, None
    student_stem = describe_stem(s_conv) if s_conv is not None else "a block, not a convolution"
    if requested in ("stem", "stem-filters"):
        return requested, f"asked for: the teacher's {teacher_stem} copied into the student's first layer"
    carries = s_conv is not None and (s_bn is not None or s_conv.bias is not None)  # somewhere for its thresholds
    if requested == "auto" and carries and _shape(t_conv) == _shape(s_conv):
        return "stem", (
            f"the student's first layer has the teacher's shape ({teacher_stem}): the teacher's is copied into it"
        )
    problems = prefix_problems(teacher)
    if problems and requested == "auto":
        raise RRMError(
            f"no transplant fits teacher {teacher.spec.get('name')!r} and student {student.spec.get('name')!r}: "
            f"their first layers differ ({teacher_stem} against {student_stem}) and the teacher's cannot run in front "
            f"of the student's ({'; '.join(problems)}); {_PREFIX_FIX}"
        )
    channels = stem_prefix_spec(teacher)["channels"]
    if requested == "stem-prefix":
        return "stem-prefix", (
            f"asked for, the teacher's ({teacher_stem}): the teacher's runs in front of it, and the student's first "
            f"layer reads its {channels} maps in place of the pixels"
        )
    pixels = student.spec.get("in_channels")
    front = (
        f"the student's first layer ({student_stem}) differs from the teacher's ({teacher_stem}): the teacher's runs"
    )
    if requested == "stem-adapter":
        front = f"asked for: the teacher's first layer ({teacher_stem}) runs"
    return "stem-adapter", (
        f"{front} in front of the student, and a trained 1x1 convolution narrows its {channels} maps to the image's "
        f"{pixels} channel{'s' if pixels != 1 else ''}, which the student reads as built"
    )


def transplanted(
    requested: str, teacher: Classifier, build: Callable[..., Classifier], frozen: bool = True
) -> tuple[Classifier, str, str]:
    """The student ``build(**extra)`` with the teacher's first layer in it, as ``requested`` (see
    :func:`choose_transplant`): ``(student, transplant, why)``. A prefix rebuilds the student around the teacher's
    stem; the other transplants copy it into the student as first built, so their seeded results do not change."""
    student = build()
    kind, why = choose_transplant(requested, teacher, student)
    if kind in ("stem-prefix", "stem-adapter"):
        adapter = student.spec["in_channels"] if kind == "stem-adapter" else None
        student = build(stem_prefix=stem_prefix_spec(teacher, adapter=adapter))
        transplant_prefix(teacher, student, frozen=frozen)
    else:
        transplant_stem(teacher, student, frozen=frozen, filters=kind == "stem-filters")
    return student, kind, why
