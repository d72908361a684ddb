"""AutoAttack (Croce & Hein 2020) with fra31's own code (``pyautoattack``, the code RobustBench runs), and the
black-box Square attack on its own for the gradient-masking checks.

:class:`AutoAttack` runs the package's attack objects, configured by the package for the chosen ``version``, as the
package's ``run_standard_evaluation`` does: each component attacks, batch by batch, only the images every earlier
component left standing, each batch with the same seed. The result is the same (tested). Two things differ, and they
are why it does not simply call ``run_standard_evaluation``:

- that function returns only ``(x_adv, y_adv)``; here the robust accuracy after each component is kept as well;
- pyautoattack 0.2.0's own state file cannot be resumed: it writes the set of attacks as its Python repr, so reading
  it back always reports "a different set of attacks". Here a JSON state is written after every batch (which images
  still stand, where the cascade is, the accuracies and times so far, and the largest perturbation), and a rerun with
  the same model, images and settings continues where it stopped. The batches are planned when a component starts
  and stored, so a resumed run attacks the same batches with the same seed and gives the same result as one run.

The package's own warnings (randomised or dynamic defences, probability outputs) are not run: the gradient-masking
checks of :mod:`rrm.evaluation.checks` cover that ground. Every attack here leaves torch's global random generator as
it was (the package reseeds it for every batch).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rrm.attacks.pgd import check_threat
from rrm.errors import RRMError, require, unknown
from rrm.io import write_json
from rrm.progress import Bar

# rrm's norm names -> the package's.
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# The package's versions and the components each runs, in order; "custom" runs the components given, with the
# budgets of "standard".
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    "custom": (),
}
STATE_FORMAT = "rrm-autoattack-state/1"
# Square as a masking check: p_init as AutoAttack's, the schedule of p rescaled to the smaller query budget (the
# Square authors' setting for budgets other than 10,000 queries).
SQUARE_P_INIT = 0.8


def package_version() -> str:
    return importlib.metadata.version("pyautoattack")


def _package():
    from pyautoattack import AutoAttack as PackageAutoAttack

    return PackageAutoAttack


def components_of(version: str, components: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The components a version runs, in order; raises :class:`RRMError` for a bad version or component list."""
    if version not in VERSIONS:
        raise unknown("AutoAttack version", version, VERSIONS)
    for name in components:
        if name not in COMPONENTS:
            raise unknown("AutoAttack component", name, COMPONENTS)
    require(len(set(components)) == len(components), f"AutoAttack components are listed twice in {list(components)}")
    if version == "custom":
        require(bool(components), "AutoAttack version 'custom' needs its components, e.g. apgd-ce,square")
        return tuple(components)
    require(
        not components,
        f"AutoAttack components {list(components)} are for version 'custom'; version "
        f"{version!r} runs {', '.join(VERSIONS[version])}",
    )
    return VERSIONS[version]


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class AutoAttackRun:
    """What a run of :class:`AutoAttack` found on its images."""

    robust: torch.Tensor  # per image: still classified correctly after every component
    x_adv: torch.Tensor  # the adversarial images found in this call; the clean image elsewhere (as the package)
    accuracy_after: dict[str, float]  # "clean", then each component in cascade order: robust accuracy after it
    seconds: dict[str, float]  # per component, summed over the sessions of a resumed run
    max_distance: float  # largest perturbation norm of any image a component fooled (0 where none was)
    min_pixel: float
    max_pixel: float
    finite: bool
    resumed: bool  # continued from a state file

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else 0.0


class AutoAttack:
    """AutoAttack on one model: ``version`` standard (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries), plus, rand,
    or custom (``components``, with standard's budgets); the settings that ran are in :attr:`settings`.

    Targeted components use ``min(9, classes - 1)`` target classes: standard's 9 where there are 10 or more classes.
    The model must be in eval mode (see :func:`rrm.attacks.frozen`); images are in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str,
        eps: float,
        num_classes: int,
        version: str = "standard",
        components: tuple[str, ...] = (),
        seed: int = 0,
        batch_size: int = 250,
    ):
        check_threat(norm, eps)
        self.components = components_of(version, tuple(components))
        require(num_classes >= 2, f"AutoAttack needs at least 2 classes, got {num_classes}")
        require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        self.model, self.norm, self.eps, self.version = model, norm, eps, version
        self.seed, self.batch_size = seed, batch_size
        device = next(model.parameters()).device
        self._aa = _package()(
            model,
            norm=NORM_NAMES[norm],
            eps=eps,
            seed=seed,
            device=device,
            version="standard" if version == "custom" else version,
        )
        targets = min(9, num_classes - 1)
        self._aa.apgd_targeted.n_target_classes = targets
        self._aa.fab.n_target_classes = targets

    @property
    def settings(self) -> dict:
        """Everything that decides the result: package and version, components in order, seed and each budget."""
        aa = self._aa
        budgets = {
            "apgd-ce": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "eot_iter": aa.apgd.eot_iter},
            "apgd-dlr": {"n_iter": aa.apgd.n_iter, "n_restarts": aa.apgd.n_restarts, "eot_iter": aa.apgd.eot_iter},
            "apgd-t": {
                "n_iter": aa.apgd_targeted.n_iter,
                "n_restarts": aa.apgd_targeted.n_restarts,
                "n_target_classes": aa.apgd_targeted.n_target_classes,
            },
            "fab": {"n_iter": aa.fab.n_iter, "n_restarts": aa.fab.n_restarts},
            "fab-t": {"n_iter": aa.fab.n_iter, "n_restarts": 1, "n_target_classes": aa.fab.n_target_classes},
            "square": {
                "n_queries": aa.square.n_queries,
                "p_init": aa.square.p_init,
                "n_restarts": aa.square.n_restarts,
            },
        }
        return {
            "package": "pyautoattack",
            "package_version": package_version(),
            "version": self.version,
            "components": ",".join(self.components),
            "norm": NORM_NAMES[self.norm],
            "eps": self.eps,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "budgets": {name: budgets[name] for name in self.components},
        }

    def _perturb(self, component: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One component on one batch, exactly as ``run_standard_evaluation`` dispatches it."""
        aa = self._aa
        if component in ("apgd-ce", "apgd-dlr"):
            aa.apgd.loss, aa.apgd.seed = component[5:], self.seed
            return aa.apgd.perturb(x, y)
        if component == "apgd-t":
            aa.apgd_targeted.seed = self.seed
            return aa.apgd_targeted.perturb(x, y)
        if component == "fab":
            aa.fab.targeted, aa.fab.seed = False, self.seed
            return aa.fab.perturb(x, y)
        if component == "fab-t":
            aa.fab.targeted, aa.fab.n_restarts, aa.fab.seed = True, 1, self.seed
            return aa.fab.perturb(x, y)
        aa.square.seed = self.seed
        return aa.square.perturb(x, y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The adversarial images of one batch (the :data:`rrm.metrics.Attack` protocol; the seed is the attack's)."""
        return self.run(x, y).x_adv

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        state_path: str | os.PathLike | None = None,
        progress: bool | None = False,
    ) -> AutoAttackRun:
        """The cascade over ``(x, y)``; with ``state_path``, progress is saved there after every batch and a run
        with the same model, images and settings continues from it. The file is left in place: remove it once the
        result is stored."""
        device = next(self.model.parameters()).device
        x, y = x.detach().float().to(device), y.detach().to(device)
        n = len(y)
        key = {**self.settings, "images": _digest(x, y), "model": _digest(*self.model.state_dict().values())}
        state = _load_state(state_path, key)
        resumed = state is not None
        if state is None:
            robust = torch.zeros(n, dtype=torch.bool, device=device)
            with torch.no_grad():
                for idx in torch.arange(n, device=device).split(self.batch_size):
                    robust[idx] = self.model(x[idx]).argmax(1) == y[idx]
            state = {
                "format": STATE_FORMAT,
                "key": key,
                "robust": robust.cpu().tolist(),
                "done": [],
                "current": None,
                "accuracy_after": {"clean": float(robust.float().mean()) if n else 0.0},
                "seconds": {},
                "max_distance": 0.0,
                "min_pixel": float(x.min()) if n else 0.0,
                "max_pixel": float(x.max()) if n else 0.0,
                "finite": True,
            }
            _save_state(state_path, state)
        robust = torch.tensor(state["robust"], dtype=torch.bool, device=device)
        x_adv = x.clone()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for component in self.components:
                if component in state["done"]:
                    continue
                if state["current"] is None or state["current"]["component"] != component:
                    state["current"] = {
                        "component": component,
                        "indices": robust.nonzero().flatten().tolist(),
                        "batches_done": 0,
                    }
                plan = torch.tensor(state["current"]["indices"], dtype=torch.long, device=device)
                batches = plan.split(self.batch_size)
                bar = Bar(
                    batches[state["current"]["batches_done"] :],
                    desc=f"autoattack: {component}",
                    leave=False,
                    disable=None if progress is None else not progress,
                )
                for idx in bar:
                    start = time.perf_counter()
                    adv = self._perturb(component, x[idx].clone(), y[idx].clone()).detach().to(device)
                    fooled = self.model(adv).argmax(1) != y[idx]
                    robust[idx[fooled]] = False
                    x_adv[idx[fooled]] = adv[fooled]
                    _record_constraint(state, x[idx[fooled]], adv[fooled], self.norm)
                    state["robust"] = robust.cpu().tolist()
                    state["current"]["batches_done"] += 1
                    state["seconds"][component] = state["seconds"].get(component, 0.0) + time.perf_counter() - start
                    _save_state(state_path, state)
                state["done"].append(component)
                state["current"] = None
                state["accuracy_after"][component] = float(robust.float().mean()) if n else 0.0
                _save_state(state_path, state)
        return AutoAttackRun(
            robust=robust,
            x_adv=x_adv,
            accuracy_after={k: state["accuracy_after"][k] for k in ("clean", *self.components)},
            seconds={k: state["seconds"].get(k, 0.0) for k in self.components},
            max_distance=state["max_distance"],
            min_pixel=state["min_pixel"],
            max_pixel=state["max_pixel"],
            finite=state["finite"],
            resumed=resumed,
        )


def _record_constraint(state: dict, x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> None:
    if not len(x):
        return
    delta = (x_adv.double() - x.double()).flatten(1)
    dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    state["max_distance"] = max(state["max_distance"], float(dist.max()))
    state["min_pixel"] = min(state["min_pixel"], float(x_adv.min()))
    state["max_pixel"] = max(state["max_pixel"], float(x_adv.max()))
    state["finite"] = state["finite"] and bool(torch.isfinite(x_adv).all())


def _load_state(path: str | os.PathLike | None, key: dict) -> dict | None:
    """The saved state of the same run, or None (no file, another run's, or unreadable: the run starts afresh)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("key") != key:
        return None
    return state


def _save_state(path: str | os.PathLike | None, state: dict) -> None:
    if path is not None:
        write_json(path, state)


def square(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, queries: int, seed: int = 0
) -> torch.Tensor:
    """The Square attack (Andriushchenko et al. 2020; AutoAttack's black-box component, margin loss, one restart) with
    ``queries`` queries per image; returns the adversarial images (the clean image where none was found).

    It uses only the model's outputs, so hidden or zeroed gradients do not stop it: a white-box accuracy well above
    Square's is the sign of gradient masking. The model must be in eval mode.
    """
    check_threat(norm, eps)
    if queries < 1:
        raise RRMError(f"Square queries must be >= 1, got {queries}")
    x = x.detach().float()
    if eps == 0 or len(x) == 0:
        return x.clone()
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(
        model,
        norm=NORM_NAMES[norm],
        n_queries=queries,
        eps=eps,
        p_init=SQUARE_P_INIT,
        n_restarts=1,
        seed=seed,
        verbose=False,
        resc_schedule=True,
        device=x.device,
    )
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        return attack.perturb(x, y).detach()


def settings_summary(run: AutoAttackRun, attack: AutoAttack) -> dict:
    """What the metrics JSON keeps of a run: the settings, the accuracy after each component, the times."""
    return {
        **{k: v for k, v in attack.settings.items() if k != "budgets"},
        "n_examples": len(run.robust),
        "accuracy_after": dict(run.accuracy_after),
        "seconds": dict(run.seconds),
        "resumed": run.resumed,
    }


__all__ = [
    "COMPONENTS",
    "NORM_NAMES",
    "VERSIONS",
    "AutoAttack",
    "AutoAttackRun",
    "components_of",
    "package_version",
    "settings_summary",
    "square",
]
