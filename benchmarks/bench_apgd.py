"""Native APGD-CE against ART's AutoPGD on the same model, examples and settings, in one run (not a timed test).

Trains a small model on mnist5k, then attacks the first ``--examples`` test images with both implementations
(same norm, eps, iterations, restarts, batch and seed) and prints both accuracies, both times and the time ratio.
Target: native at least 5x faster, accuracy within 1 point.

Where to expect what: the native attack stops working on an image once it is fooled, while ART runs every
iteration on the whole batch; so a naturally trained model at Linf 0.3 (every image falls within a few iterations)
shows the largest ratio. Images that survive cost ART one forward/backward plus one more forward per iteration and
the native attack one forward/backward, so on a CPU, where numpy is not the bottleneck, the ratio for them is
~1.3-1.5x; ART's numpy round trips cost most on a GPU. A smaller ``--eps`` leaves images standing, which is the
informative comparison of accuracy. Wall times on shared machines vary a lot: CPU seconds of this process are
printed too, and "image passes" counts the images through the model's forward for each side.

    PYTHONPATH=. python benchmarks/bench_apgd.py              # natural model, Linf 0.3 (the setting of the comparison)
    PYTHONPATH=. python benchmarks/bench_apgd.py --eps 0.1    # about two thirds of the images survive
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import trained_cnn

from rrm.attacks import apgd, art_apgd, frozen
from rrm.data import load_dataset, to_float


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def timed(model: torch.nn.Module, fn) -> tuple[torch.Tensor, float, float, int]:
    """``fn()``, its wall and CPU seconds, and the number of images that went through ``model``'s forward."""
    passes = [0]
    hook = model.register_forward_hook(lambda module, inputs, output: passes.__setitem__(0, passes[0] + len(output)))
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        out = fn()
    finally:
        hook.remove()
    return out, time.perf_counter() - wall, time.process_time() - cpu, passes[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="natural", help="training method of the attacked model")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--norm", default="linf", choices=("linf", "l2"))
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_dataset("mnist5k")
    model = trained_cnn(data, args.method, args.epochs, args.norm, args.eps, args.seed)
    x, y = to_float(data.test_x[: args.examples]), data.test_y[: args.examples]
    settings = dict(norm=args.norm, eps=args.eps, steps=args.steps, restarts=args.restarts, seed=args.seed)

    def native() -> torch.Tensor:
        # Same batches as ART's implicit batching, so neither side gets a larger vectorised batch.
        return torch.cat(
            [apgd(model, xb, yb, **settings) for xb, yb in zip(x.split(args.batch_size), y.split(args.batch_size))]
        )

    with frozen(model):
        accuracy(model, x, y)  # warm-up: first-call allocations are no attack's cost
        x_native, native_s, native_cpu, native_passes = timed(model, native)
        x_art, art_s, art_cpu, art_passes = timed(
            model, lambda: art_apgd(model, x, y, num_classes=data.num_classes, batch_size=args.batch_size, **settings)
        )
    clean, acc_native, acc_art = accuracy(model, x, y), accuracy(model, x_native, y), accuracy(model, x_art, y)
    gap = abs(acc_native - acc_art) * 100
    print(f"model: cnn, {args.method}, {args.epochs} epochs on mnist5k; {len(y)} test images, clean {clean:.2%}")
    print(
        f"attack: APGD-CE {args.norm} eps {args.eps}, {args.steps} iterations x {args.restarts} restarts, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    for name, acc, wall, cpu, passes in (
        ("native APGD", acc_native, native_s, native_cpu, native_passes),
        ("ART AutoPGD", acc_art, art_s, art_cpu, art_passes),
    ):
        print(f"{name} : accuracy {acc:7.2%}  wall {wall:8.2f} s  cpu {cpu:8.2f} s  image passes {passes:>9,}")
    print(
        f"speed-up {art_s / native_s:.1f}x wall, {art_cpu / native_cpu:.1f}x cpu (target >= 5x); "
        f"accuracy gap {gap:.1f} points (target <= 1)"
    )


if __name__ == "__main__":
    main()
