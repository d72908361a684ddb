"""Counted FLOPs against measured step time, per training method, side by side in one run (not a timed test).

`rrm report` compares methods by the FLOPs each run counted (rrm/train/flops.py), because wall time on shared
machines varies by up to 50% between identical runs. This checks that the count tells the same story as the clock:
for each method it counts one real training step under FlopCounter, times the same steps in rounds (methods take
turns, the median per method is kept, so load drifts hit every method alike) and prints both as ratios to natural
training. Target: each time ratio within 20% of its FLOP ratio. Both wall and CPU seconds of this process are given;
on a busy machine CPU seconds are the steadier of the two.

Where they disagree, the count is not wrong but partial: it holds matrix products and convolutions only. Element-wise
work (BatchNorm, ReLU, the attack's sign, projection and clamping, random starts, the optimiser's update) and
per-call overhead cost time but no counted FLOPs, so methods with many small passes (PGD steps) take more time per
counted FLOP on a small model; on large models matrix products dominate and the two converge.

    PYTHONPATH=. python benchmarks/bench_flops.py                       # natural, sat, rrm, fast on mnist5k
    PYTHONPATH=. python benchmarks/bench_flops.py --rounds 5 --steps 6 --only natural,sat,kd
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
from rrm.train.flops import FlopCounter

DEFAULT = ("natural", "sat", "rrm", "fast")
AGREEMENT = 0.20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--student", default="cnn-bn")
    parser.add_argument("--teacher", default="cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--attack-steps", type=int, default=5, help="PGD steps of sat (the default pipeline's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(DEFAULT), help=f"methods, from: {', '.join(METHODS)}")
    args = parser.parse_args()
    names = ["natural", *[n for n in args.only.split(",") if n != "natural"]]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset(args.dataset)
    kw = data.model_kwargs()
    teacher = build_model(args.teacher, **kw).eval().requires_grad_(False)
    feature_dim = teacher.feature_dim if build_model(args.student, **kw).feature_dim != teacher.feature_dim else None
    batch_list = fixed_batches(data, args.batch_size, args.steps)

    runners, flops = {}, {}
    for name in names:
        cfg = TrainConfig(method=name, eps=args.eps, attack_steps=args.attack_steps, lam=0.05)
        student = build_model(args.student, **kw, feature_dim=feature_dim).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

        def step(loss, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        method = METHODS[name](cfg, teacher if METHODS[name].needs_teacher else None)
        x, y = batch_list[-1]  # counted on a batch that is not timed, as the trainer counts its first step
        with FlopCounter() as counter:
            method.train_batch(student, x, y, step)
        flops[name] = counter.get_total_flops() / method.epochs_per_pass
        runners[name] = (method, student, step)

    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds + 1):  # round 0 warms up allocators and kernels and is discarded
        for name in names:
            method, student, step = runners[name]
            started, started_cpu = time.perf_counter(), time.process_time()
            for x, y in batch_list[: args.steps]:
                method.train_batch(student, x, y, step)
            per = args.steps * method.epochs_per_pass
            if r:
                wall[name].append((time.perf_counter() - started) / per)
                cpu[name].append((time.process_time() - started_cpu) / per)

    print(
        f"dataset={args.dataset} student={args.student} teacher={args.teacher} batch={args.batch_size} "
        f"eps={args.eps} attack_steps={args.attack_steps} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"steps={args.steps}"
    )
    print(
        f"{'method':<10}{'GFLOP/step':>11}{'x nat':>7}{'ms/step':>9}{'x nat':>7}{'cpu ms':>8}{'x nat':>7}"
        f"{'wall/FLOPs':>11}{'cpu/FLOPs':>10}  within {AGREEMENT:.0%}"
    )
    natural_wall, natural_cpu = statistics.median(wall["natural"]), statistics.median(cpu["natural"])
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ratio_flops, ratio_wall, ratio_cpu = flops[name] / flops["natural"], w / natural_wall, c / natural_cpu
        agree_wall, agree_cpu = ratio_wall / ratio_flops, ratio_cpu / ratio_flops
        ok = "yes" if abs(agree_cpu - 1) <= AGREEMENT else "no"
        print(
            f"{name:<10}{flops[name] / 1e9:>11.2f}{ratio_flops:>7.2f}{w * 1000:>9.1f}{ratio_wall:>7.2f}"
            f"{c * 1000:>8.1f}{ratio_cpu:>7.2f}{agree_wall:>11.2f}{agree_cpu:>10.2f}  {ok}"
        )


if __name__ == "__main__":
    main()
