"""Standard AutoAttack against the native APGD-CE on the same model and images: time and accuracy (not a timed test).

Attacks the first ``--examples`` test images of a model file (``--model``, e.g. the default pipeline's
runs/teacher/model.pt) or of a model it trains first, with:

- the native APGD-CE at the pipeline's budget (``--steps``, 1 restart) and at AutoAttack's (100 iterations);
- AutoAttack's own APGD-CE alone (pyautoattack, ``version='custom'``), on the same images at the same budget: the
  agreement target is within 1 point of the native one;
- standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5,000), with the robust accuracy and the seconds after each
  component.

Wall and CPU seconds of this process are printed (shared machines are noisy), and the projection the pipeline's
``autoattack_examples`` was chosen with: seconds per attacked image and per image still robust after APGD-CE.

    PYTHONPATH=. python benchmarks/bench_autoattack.py --model runs/teacher/model.pt --dataset data/mnist5k.safetensors
    PYTHONPATH=. python benchmarks/bench_autoattack.py --method sat --epochs 2 --eps 0.2   # trains a cnn first
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import trained_cnn

from rrm.attacks import apgd, frozen
from rrm.attacks.autoattack import AutoAttack, package_version
from rrm.data import load_dataset, to_float
from rrm.evaluation import load_for_evaluation


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model file; without it a cnn is trained with --method")
    parser.add_argument("--dataset", default="mnist5k", help="registered name or prepared file")
    parser.add_argument("--method", default="sat")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--eps", type=float, default=0.2)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20, help="native APGD-CE iterations at the pipeline's budget")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.dataset)
    if args.model:
        model = load_for_evaluation(args.model)[0]
    else:
        model = trained_cnn(data, args.method, args.epochs, args.norm, args.eps, args.seed)
    x, y = to_float(data.test_x[: args.examples]), data.test_y[: args.examples]
    threat = dict(norm=args.norm, eps=args.eps)

    def native(steps: int) -> float:
        with frozen(model):
            return accuracy(model, apgd(model, x, y, **threat, steps=steps, restarts=1, seed=args.seed), y)

    def autoattack(version: str, components: tuple[str, ...] = ()):
        with frozen(model):
            return AutoAttack(
                model,
                **threat,
                num_classes=data.num_classes,
                version=version,
                components=components,
                seed=args.seed,
                batch_size=args.batch_size,
            ).run(x, y)

    accuracy(model, x, y)  # warm-up
    print(
        f"model={args.model or args.method} dataset={data.name} {args.norm} eps={args.eps} images={len(y)} "
        f"threads={torch.get_num_threads()} pyautoattack={package_version()}"
    )
    print(f"clean accuracy {accuracy(model, x, y):.4f}")
    print(f"{'attack':<34}{'accuracy':>9}{'wall s':>9}{'cpu s':>8}")
    for steps in sorted({args.steps, 100}):
        acc, wall, cpu = timed(lambda steps=steps: native(steps))
        print(f"{f'native APGD-CE {steps} it':<34}{acc:>9.4f}{wall:>9.1f}{cpu:>8.1f}")
        if steps == 100:
            native_100 = acc
    run, wall, cpu = timed(lambda: autoattack("custom", ("apgd-ce",)))
    print(f"{'AutoAttack APGD-CE 100 it':<34}{run.accuracy:>9.4f}{wall:>9.1f}{cpu:>8.1f}")
    print(f"agreement native - AutoAttack APGD-CE: {100 * (native_100 - run.accuracy):+.1f} points (target: within 1)")
    run, wall, cpu = timed(lambda: autoattack("standard"))
    print(f"{'AutoAttack standard':<34}{run.accuracy:>9.4f}{wall:>9.1f}{cpu:>8.1f}")
    for component, seconds in run.seconds.items():
        print(f"  after {component:<26}{run.accuracy_after[component]:>9.4f}{seconds:>9.1f}")
    survivors = run.accuracy_after["apgd-ce"] * len(y)
    rest = sum(s for c, s in run.seconds.items() if c != "apgd-ce")
    print(
        f"per image: {wall / len(y):.3f} s wall; APGD-CE {run.seconds['apgd-ce'] / len(y):.3f} s per image, "
        f"the rest {rest / max(survivors, 1):.3f} s per image still robust after it ({survivors:.0f} images)"
    )


if __name__ == "__main__":
    main()
