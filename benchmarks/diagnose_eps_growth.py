"""Why APGD stalls when the eps ball holds every image: which test images survive APGD-10 at Linf eps 1.0, what the
model calls the attacked images and its random starts, the input gradient on the survivors, and what a start from
another class's image reaches (the `reachable` check). Not a timing: the numbers behind notebook/studies.md, "Why APGD
stalls on the stem-filters students".

    PYTHONPATH=. python benchmarks/diagnose_eps_growth.py runs/transfer/resnet8/seed0/natural/model.pt
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F

from rrm.attacks import apgd
from rrm.data import load_dataset, to_float
from rrm.evaluation import load_for_evaluation, other_class_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--dataset", default="data/mnist5k.safetensors")
    parser.add_argument("--n-examples", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = load_for_evaluation(args.model)
    model.requires_grad_(False)
    data = load_dataset(args.dataset)
    x, y = to_float(data.test_x[: args.n_examples]), data.test_y[: args.n_examples]
    adv = apgd(model, x, y, norm="linf", eps=1.0, steps=10, restarts=1, seed=0)
    with torch.no_grad():
        pred = model(adv).argmax(1)
    alive = pred == y
    survivors = dict(collections.Counter(y[alive].tolist()))
    print(f"APGD-10 at eps 1.0 leaves {alive.float().mean():.0%}; survivors' labels {survivors}")
    print(f"predictions on the attacked images: {collections.Counter(pred.tolist()).most_common(3)}")
    if alive.any():
        a = adv[alive].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(a), y[alive], reduction="sum"), a)
        print(f"input-gradient L1 on the survivors: median {grad.flatten(1).abs().sum(1).median():.2e}")
    noise = (x + torch.empty_like(x).uniform_(-1, 1)).clamp(0, 1)  # what a random start at eps 1 looks like
    with torch.no_grad():
        print(f"predictions on random starts: {collections.Counter(model(noise).argmax(1).tolist()).most_common(3)}")
        start = other_class_starts(model, x, y)
        reached = apgd(model, x, y, norm="linf", eps=1.0, steps=10, restarts=1, seed=0, start=start)
    with torch.no_grad():
        print(f"from another class's image: {(model(reached).argmax(1) == y).float().mean():.0%} left")


if __name__ == "__main__":
    main()
