"""How each config field appears on the command line: its group in ``--help``, its help text and, for names, the
allowed values. The options themselves are generated from the configs (:func:`rrm.cli.options.config_options`)."""

from __future__ import annotations

from rrm import jobs
from rrm.attacks import NORMS
from rrm.attacks.autoattack import COMPONENTS as AA_COMPONENTS
from rrm.attacks.autoattack import VERSIONS as AA_VERSIONS
from rrm.cli.options import Spec
from rrm.evaluation import ATTACKS, TRANSFER_ATTACKS
from rrm.models import ARCHITECTURES
from rrm.models.transplant import TRANSPLANTS
from rrm.train import FEATURE_LOSSES, MATCH_INPUTS, METHODS, PRECISIONS, SCHEDULES, tunable_methods
from rrm.tune.config import MODES, PRUNERS

THREAT = {
    "norm": Spec("attack", "Threat model norm.", NORMS, "norm"),
    "eps": Spec("attack", "Threat model radius in [0, 1] pixel units (8/255 = 0.0314)."),
}
TRAIN = {
    "dataset": Spec("data", "Registered dataset name, or a file or shards from `rrm data prepare` / `rrm robustify`."),
    "model": Spec("model", "Architecture.", tuple(ARCHITECTURES), "model"),
    "width": Spec("model", "Channel width multiplier (small models)."),
    "feature_dim": Spec("model", "Add a linear layer so the features have this size (match the teacher's)."),
    "method": Spec("method", "Training method.", tuple(METHODS), "method"),
    "teacher": Spec(
        "method", "Teacher of rrm/kd/kdiga: a model file or a registry URI such as models:/rrm-teacher@champion."
    ),
    "lam": Spec(
        "method", "rrm: lambda, the weight of the cross-entropy term (> 0; the paper's plateau is 5e-5 to 1e-2)."
    ),
    "feature_loss": Spec("method", "rrm: the feature loss.", FEATURE_LOSSES, "feature loss"),
    "match_inputs": Spec(
        "method",
        "rrm: where features are matched (the last three add a perturbed copy of each "
        "batch; teacher-* attack the teacher only).",
        MATCH_INPUTS,
        "match inputs",
    ),
    "kd_weight": Spec("method", "rrm: weight of a KD term on the teacher's logits at --temperature (0: off)."),
    "iga_weight": Spec("method", "rrm: weight of KDIGA's input-gradient alignment (0: off)."),
    "temperature": Spec("method", "kd, kdiga (and rrm's KD term): temperature."),
    "alpha": Spec("method", "kd, kdiga: weight of the distillation term."),
    "gamma": Spec("method", "kdiga: weight of input-gradient alignment."),
    "replays": Spec("method", "free: minibatch replays m."),
    "eps_warmup_epochs": Spec(
        "attack",
        "Adversarial methods: ramp the training eps linearly over these first epochs "
        "(passes for free); 0: full eps from the start.",
    ),
    "match_layers": Spec(
        "method",
        "rrm: stages matched, NAME or NAME:WEIGHT, comma-separated (stem, block1.., "
        "penultimate); a student stage of another shape is matched through an adapter.",
    ),
    "transplant": Spec(
        "method",
        "Give the student the teacher's robust first layer before training (any method; try it with "
        "--method fast): auto picks for the pair and says why; stem copies the whole layer (the same shape); "
        "stem-filters, the filters the teacher's next layer reads most, into a stem with fewer; stem-prefix "
        "runs the teacher's layer in front of the student's own, which reads its maps (any shape); stem-adapter "
        "runs it in front of the student as built, through a trained 1x1 convolution (any student, cheaper).",
        TRANSPLANTS,
        "transplant",
    ),
    "transplant_frozen": Spec("method", "Keep the transplanted stem frozen (--no-transplant-frozen fine-tunes it)."),
    "noise_magnitude": Spec("method", "n-fgsm: radius of the uniform noise. [default: 2 * eps]"),
    "project_to_eps": Spec("method", "n-fgsm: project the perturbation back to the eps-ball (de Jorge et al. do not)."),
    "grad_align_weight": Spec(
        "method", "fast: weight of GradAlign's gradient-alignment term (0: off; about 3x the cost)."
    ),
    "early_stop_on_co": Spec(
        "method",
        "fast, n-fgsm, free: stop at catastrophic overfitting (PGD monitor accuracy "
        "collapses while single-step accuracy holds) and keep the weights before it.",
    ),
    **THREAT,
    "step_size": Spec("attack", "Attack step. [default: the method's]"),
    "attack_steps": Spec("attack", "PGD steps of adversarial training (and of rrm's teacher-pgd)."),
    "random_start": Spec("attack", "Start training attacks at a random point of the eps-ball."),
    "monitor_examples": Spec("attack", "Test images attacked after each epoch (0 turns the monitor off)."),
    "monitor_steps": Spec("attack", "PGD steps of the per-epoch monitor."),
    "epochs": Spec("schedule", "Epochs (free: passes x replays, as the paper counts them)."),
    "batch_size": Spec("schedule", "Batch size."),
    "lr": Spec("schedule", "Peak learning rate of SGD."),
    "momentum": Spec("schedule", "SGD momentum."),
    "weight_decay": Spec("schedule", "Weight decay."),
    "schedule": Spec("schedule", "Learning-rate schedule. [default: the method's]", SCHEDULES, "schedule"),
    "milestones": Spec("schedule", "Epochs at which the step schedule multiplies the rate by --lr-gamma, e.g. 30,40."),
    "lr_gamma": Spec("schedule", "Rate multiplier at each milestone."),
    "precision": Spec("runtime", "Autocast precision. [default: the method's]", PRECISIONS, "precision"),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "seed": Spec("runtime", "Random seed."),
    "deterministic": Spec("runtime", "Use deterministic algorithms (slower)."),
    "channels_last": Spec("runtime", "Channels-last memory format (faster for conv nets)."),
    "compile": Spec(
        "runtime", "torch.compile the model's features (and the teacher's): faster on GPUs after a compile pause."
    ),
    "data_on_device": Spec(
        "runtime", "Keep the whole training set on the device and batch there (data that fits in its memory)."
    ),
    "sync_batchnorm": Spec("runtime", "Under torchrun on CUDA: BatchNorm statistics over the global batch."),
    "out_dir": Spec("runtime", "Directory for checkpoint.pt, model.pt and train_metrics.json."),
    "resume": Spec(
        "runtime",
        "Continue from the checkpoint in --out-dir; with no checkpoint there, an error (a typo "
        "in --out-dir must not silently start over: see --resume-or-start).",
    ),
    "resume_or_start": Spec(
        "runtime",
        "Continue from the checkpoint in --out-dir when there is one, else start a new "
        "run (reruns of a pipeline stage).",
    ),
    "progress": Spec("runtime", "Progress bars. [default: when stderr is a terminal]"),
}

ROBUSTIFY = {
    "teacher": Spec("method", "Robust teacher: a model file or a registry URI such as models:/rrm-teacher@champion."),
    "teacher_pin": Spec(
        "method",
        "A model file the teacher must equal (a copy `rrm teacher pull` wrote, a DVC dependency): fail when the "
        "alias of a models:/ teacher has moved since.",
    ),
    "dataset": Spec("data", "Registered dataset name, a prepared .safetensors file or a directory of shards."),
    "out": Spec("data", "Output .safetensors file, or directory with --shards."),
    "shards": Spec(
        "data",
        "Stream the output into a directory of shards, one batch a shard: memory holds a batch, not the dataset; "
        "rerun the same command after an interruption to resume from the finished shards.",
    ),
    "steps": Spec("method", "Feature-matching steps per image."),
    "step_size": Spec("method", "L2 step of each update."),
    "batch_size": Spec("runtime", "Images per batch."),
    "seed": Spec("runtime", "Seed of the random start images."),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "progress": Spec("runtime", "Progress bar. [default: when stderr is a terminal]"),
}

EVALUATE = {
    **THREAT,
    "attacks": Spec(
        "attack",
        f"Attacks, comma-separated: {', '.join(ATTACKS)} (art-apgd is the paper's reference; "
        "autoattack is fra31's AutoAttack, RobustBench's).",
    ),
    "n_examples": Spec("data", "Test images attacked (the first n). [default: the whole test split]"),
    "batch_size": Spec("runtime", "Images per attack batch."),
    "steps": Spec("attack", "APGD iterations (native and ART)."),
    "restarts": Spec("attack", "APGD random restarts (native and ART)."),
    "pgd_steps": Spec("attack", "PGD steps of the pgd attack."),
    "pgd_step_size": Spec("attack", "PGD step. [default: 2.5 * eps / pgd-steps]"),
    "transfer_attack": Spec("attack", "How `transfer` crafts on --transfer-from.", TRANSFER_ATTACKS, "transfer attack"),
    "autoattack_version": Spec(
        "attack",
        "AutoAttack: standard (APGD-CE, APGD-T, FAB-T, Square 5000), plus, rand, or "
        "custom (--autoattack-components, standard's budgets).",
        tuple(AA_VERSIONS),
        "AutoAttack version",
    ),
    "autoattack_components": Spec(
        "attack", f"custom AutoAttack: components in order, from {', '.join(AA_COMPONENTS)}. [default: none]"
    ),
    "autoattack_examples": Spec(
        "data", "Test images AutoAttack attacks (the first n of those attacked). [default: all of them]"
    ),
    "sanity": Spec("attack", "Run the gradient-masking sanity checks."),
    "sanity_examples": Spec("attack", "Test images the sanity checks attack."),
    "sanity_steps": Spec("attack", "APGD iterations of the sanity attacks."),
    "sanity_square_queries": Spec("attack", "Queries per image of the black-box Square check."),
    "sanity_tolerance": Spec("attack", "Accuracy slack of the monotonicity checks."),
    "sanity_zero_accuracy": Spec("attack", "Accuracy the largest eps must push the model down to."),
    "seed": Spec("runtime", "Random seed of the attacks."),
    "dataset": Spec("data", "Dataset name, prepared file or shards. [default: the one the model was trained on]"),
    "transfer_from": Spec(
        "model", "Model that crafts the `transfer` attack and check (file or registry URI): for a student, its teacher."
    ),
    "out": Spec(
        "data", "Metrics JSON to write. [default: eval_metrics.json, or robustbench.json, beside a model file]"
    ),
    "device": Spec("runtime", "auto, cpu, cuda, cuda:N or mps."),
    "progress": Spec("runtime", "Progress bars. [default: when stderr is a terminal]"),
    "train_run_id": Spec("tracking", "Training run to link to. [default: the run that logged this model file]"),
    "format": Spec(
        "data",
        "What --out holds: rrm (every number and the sanity checks) or robustbench (RobustBench's "
        "model_info JSON; needs autoattack).",
        jobs.EVALUATE_FORMATS,
        "output format",
    ),
}

TUNE = {
    "method": Spec("method", "Method whose knobs are tuned.", tunable_methods(), "tuning method"),
    "mode": Spec(
        "method",
        "pareto: maximise natural and APGD accuracy, the Pareto front is the answer; "
        "constrained: maximise APGD accuracy with a natural-accuracy floor, with pruning.",
        MODES,
        "tuning mode",
    ),
    "n_trials": Spec(
        "method", "Finished trials the study should have (a restart continues up to it; workers share it)."
    ),
    "knobs": Spec(
        "method",
        "Knobs to tune, comma-separated: the method's own (lambda; temperature, alpha; gamma) "
        "and lr, epochs. [default: the method's]",
    ),
    "min_natural_accuracy": Spec("method", "Validation natural-accuracy floor, a constraint in either mode."),
    "pruner": Spec(
        "method",
        "Pruner (constrained mode only). [default: median when constrained, none for pareto]",
        PRUNERS,
        "pruner",
    ),
    "prune_below": Spec("method", "Threshold pruner: stop a trial whose APGD accuracy falls below this."),
    "storage": Spec(
        "runtime",
        "Optuna storage: sqlite:///FILE.db (one process), journal:FILE.log (several "
        "processes on one host), postgresql://USER:PASSWORD@HOST:PORT/DB (many hosts).",
    ),
    "study_name": Spec("runtime", "Study to create or resume. [default: METHOD-MODEL-DATASET]"),
    "seed": Spec("runtime", "Sampler seed, also every trial's training seed."),
    "validation_size": Spec("data", "Fraction of the training split held out to score trials."),
    "attack_examples": Spec("attack", "Validation images attacked by APGD after each epoch."),
    "attack_steps": Spec("attack", "APGD iterations of the per-epoch score."),
    "best_trials": Spec("attack", "Best trials evaluated on the test split."),
    "test_examples": Spec("attack", "Test images attacked in that evaluation. [default: all]"),
    "test_steps": Spec("attack", "APGD iterations of that evaluation."),
    "test_restarts": Spec("attack", "APGD restarts of that evaluation."),
    "out_dir": Spec(
        "runtime", "Directory for trials.csv, results.json, the plots and trials/N/model.pt. [default: runs/tune/STUDY]"
    ),
}

REPORT = {
    "root": Spec("data", "Directory the paths below are relative to."),
    "students_dir": Spec(
        "data", "Student runs: <name>/train_metrics.json, or seed<N>/<name>/train_metrics.json to average over seeds."
    ),
    "evaluations_dir": Spec("data", "Their evaluations: <name>.json, or seed<N>/<name>.json."),
    "teacher_dir": Spec("data", "The teacher's run (train_metrics.json; optional)."),
    "teacher_evaluation": Spec("data", "The teacher's evaluation."),
    "out_dir": Spec("data", "Directory for the tables (.md, .csv), report.json and the plot."),
    "attack": Spec(
        "attack",
        "The adversarial column, the same attack for every row (every evaluation must have run it). "
        "[default: the strongest each evaluation ran: autoattack, else art-apgd, else apgd]",
        ("autoattack", "art-apgd", "apgd"),
        "attack",
    ),
}
