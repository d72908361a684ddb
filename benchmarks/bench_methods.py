"""Per-step cost of every training method for the same student, measured side by side and printed as ratios.

Each method's ``train_batch`` runs on the same batches of real data through the same optimiser step the trainer
uses. Methods take turns in rounds (natural, rrm, ..., natural, rrm, ...) and the median step time per method is
reported, so drifts in machine load hit every method alike. Free AT replays each batch m times and counts each
replay as an epoch, so its cost is reported per replay. RRM's matching variants (``rrm:...``) are timed beside the
methods, teacher passes and teacher attacks included, and every row is given as a ratio to natural and to SAT.

    python benchmarks/bench_methods.py                      # mnist5k, cnn-bn student, cnn teacher
    python benchmarks/bench_methods.py --student resnet8 --teacher resnet8 --dataset digits
    python benchmarks/bench_methods.py --only natural,sat,rrm,rrm:teacher-pgd
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import fixed_batches

from rrm.data import load_dataset
from rrm.models import build_model
from rrm.train import METHODS, TrainConfig

ORDER = ["natural", "rrm", "kd", "kdiga", "sat", "pgd-fast", "free", "fast"]
# RRM's matching variants: the options each adds to the paper's RRM (method rrm, clean inputs, cosine).
VARIANTS = {
    "rrm:direction-norm": dict(feature_loss="direction-norm"),
    "rrm:kd": dict(kd_weight=1.0),
    "rrm:iga": dict(iga_weight=1.0),
    "rrm:noise": dict(match_inputs="noise"),
    "rrm:teacher-fgsm": dict(match_inputs="teacher-fgsm"),
    "rrm:teacher-pgd": dict(match_inputs="teacher-pgd"),
    "rrm:teacher-pgd+dn+kd": dict(match_inputs="teacher-pgd", feature_loss="direction-norm", kd_weight=1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--student", default="cnn-bn")
    parser.add_argument("--teacher", default="cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--only",
        help=f"comma-separated rows to time (natural and sat are always timed), from: {', '.join([*ORDER, *VARIANTS])}",
    )
    args = parser.parse_args()
    names = [*ORDER, *VARIANTS]
    if args.only:
        asked = args.only.split(",")
        unknown = sorted(set(asked) - set(names))
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from: {', '.join(names)}")
        names = [n for n in names if n in {"natural", "sat", *asked}]

    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    kw = data.model_kwargs()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher = build_model(args.teacher, **kw).to(memory_format=memory).eval().requires_grad_(False)
    feature_dim = teacher.feature_dim if build_model(args.student, **kw).feature_dim != teacher.feature_dim else None
    batch_list = fixed_batches(data, args.batch_size, args.steps)
    batch_list = [(x.contiguous(memory_format=memory), y) for x, y in batch_list]

    runners = {}
    for name in names:
        method_name = name.split(":")[0]
        cfg = TrainConfig(method=method_name, eps=0.3, attack_steps=7, replays=8, lam=0.5, **VARIANTS.get(name, {}))
        student = build_model(args.student, **kw, feature_dim=feature_dim).to(memory_format=memory).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

        def step(loss, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        method = METHODS[method_name](cfg, teacher if METHODS[method_name].needs_teacher else None)
        runners[name] = (method, student, step)

    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds + 1):  # round 0 warms up allocators and kernels and is discarded
        for name in names:
            method, student, step = runners[name]
            started = time.perf_counter()
            for x, y in batch_list[: args.steps]:
                method.train_batch(student, x, y, step)
            per_step = (time.perf_counter() - started) / args.steps / method.epochs_per_pass
            if r:
                times[name].append(per_step)

    natural, sat = statistics.median(times["natural"]), statistics.median(times["sat"])
    print(
        f"dataset={args.dataset} student={args.student} teacher={args.teacher} batch={args.batch_size} "
        f"threads={torch.get_num_threads()} channels_last={args.channels_last} rounds={args.rounds}"
    )
    print(f"{'method':<24}{'ms/step':>10}{'x natural':>11}{'x sat':>8}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:<24}{med * 1000:>10.1f}{med / natural:>11.2f}{med / sat:>8.2f}")


if __name__ == "__main__":
    main()
