"""``rrm probe``: where a model's robustness sits (first-layer thresholds; agreement with its teacher)."""

from __future__ import annotations

import click
import cloup

from rrm import jobs
from rrm.attacks import NORMS
from rrm.cli import cli
from rrm.cli.options import Spec, config_options, from_params

PROBE = {
    "teacher": Spec(
        "model", "A teacher (file or registry URI) to compare with, stage by stage, on clean and attacked inputs."
    ),
    "dataset": Spec("data", "Dataset name, prepared file or shards. [default: the one the model was trained on]"),
    "norm": Spec("attack", "Threat model norm.", NORMS, "norm"),
    "eps": Spec("attack", "Threat model radius in [0, 1] pixel units."),
    "n_examples": Spec("data", "Test images for the agreement."),
    "steps": Spec("attack", "APGD iterations of the attack on the model."),
    "seed": Spec("runtime", "Random seed of the attack."),
    "out": Spec("data", "Write the numbers to this JSON file."),
}


@cli.command()
@from_params("probe")
@cloup.argument(
    "model", required=False, help="A model file or a registry URI; required, or `model:` in the params section."
)
@config_options(PROBE, (jobs.ProbeConfig, list(PROBE)))
def probe(model: str | None, **options) -> None:
    """Where MODEL's robustness sits: its first-layer thresholds and, with --teacher, where it agrees with the teacher.

    A robust MNIST model keeps many first-layer filters silent under background haze up to eps (a large
    background margin against a small eps-gain); a student that matched only clean penultimate features does not.

    \b
    Examples:
      rrm probe runs/teacher/model.pt --eps 0.3
      rrm probe runs/students/rrm/model.pt --teacher runs/teacher/model.pt --eps 0.3 --out metrics/probe-rrm.json
    """
    result = jobs.probe_job(jobs.ProbeConfig(model=model, **options))
    rows = [("model", result["stem"])] + ([("teacher", result["teacher_stem"])] if "teacher_stem" in result else [])
    click.echo(f"first layer ({result['norm']}, eps {result['eps']}):")
    for who, stem in rows:
        click.echo(
            f"  {who:8s} {stem['silent_fraction']:6.1%} of {stem['filters']} filters silent under haze; "
            f"median background margin {stem['median_background_margin']:.3f}, "
            f"median eps-gain {stem['median_eps_gain']:.3f}"
        )
    if "agreement" in result:
        a = result["agreement"]
        click.echo(
            f"agreement with the teacher (mean cosine, {a['n_examples']} test images; attacked: APGD on the "
            f"model, which keeps {a['student_accuracy_on_attack']:.1%} and the teacher "
            f"{a['teacher_accuracy_on_attack']:.1%}):"
        )
        for name, values in a["layers"].items():
            click.echo(f"  {name:12s} clean {values['clean']:.3f}  attacked {values['attacked']:.3f}")
        if a["skipped"]:
            click.echo(f"  (not compared, shapes differ: {', '.join(a['skipped'])})")
    if options.get("out"):
        click.echo(f"wrote {options['out']}")
