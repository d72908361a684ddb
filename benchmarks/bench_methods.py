"""Per-step cost of every training method for the same student, measured side by side and printed as ratios.

Each method's ``train_batch`` runs on the same batches of real data through the same optimiser step the trainer
uses. Methods take turns in rounds (natural, rrm, ..., natural, rrm, ...) and the median step time per method is
reported, so drifts in machine load hit every method alike. Free AT replays each batch m times and counts each
replay as an epoch, so its cost is reported per replay.

    python benchmarks/bench_methods.py                      # mnist5k, cnn-bn student, cnn teacher
    python benchmarks/bench_methods.py --student resnet8 --teacher resnet8 --dataset digits
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rrm.data import batches, load_dataset
from rrm.models import build_model
from rrm.train import METHODS, TrainConfig

ORDER = ["natural", "rrm", "kd", "kdiga", "sat", "pgd-fast", "free", "fast"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--student", default="cnn-bn")
    parser.add_argument("--teacher", default="cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    kw = data.model_kwargs()
    teacher = build_model(args.teacher, **kw).eval().requires_grad_(False)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    feature_dim = teacher.feature_dim if build_model(args.student, **kw).feature_dim != teacher.feature_dim else None
    batch_list = list(batches(data.train_x, data.train_y, args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(0), drop_last=True))[: args.steps + 1]
    batch_list = [(x.contiguous(memory_format=memory), y) for x, y in batch_list]

    runners = {}
    for name in ORDER:
        cfg = TrainConfig(method=name, eps=0.3, attack_steps=7, replays=8, lam=0.5)
        student = build_model(args.student, **kw, feature_dim=feature_dim).to(memory_format=memory).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

        def step(loss, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        method = METHODS[name](cfg, teacher if METHODS[name].needs_teacher else None)
        runners[name] = (method, student, step)

    times: dict[str, list[float]] = {name: [] for name in ORDER}
    for r in range(args.rounds + 1):  # round 0 warms up allocators and kernels and is discarded
        for name in ORDER:
            method, student, step = runners[name]
            started = time.perf_counter()
            for x, y in batch_list[: args.steps]:
                method.train_batch(student, x, y, step)
            per_step = (time.perf_counter() - started) / args.steps / method.epochs_per_pass
            if r:
                times[name].append(per_step)

    natural = statistics.median(times["natural"])
    print(f"dataset={args.dataset} student={args.student} teacher={args.teacher} batch={args.batch_size} "
          f"threads={torch.get_num_threads()} channels_last={args.channels_last} rounds={args.rounds}")
    print(f"{'method':<10}{'ms/step':>10}{'x natural':>11}")
    for name in ORDER:
        med = statistics.median(times[name])
        print(f"{name:<10}{med * 1000:>10.1f}{med / natural:>11.2f}")


if __name__ == "__main__":
    main()
