"""`mlflow ui` in a real browser, as a newcomer opens it: headless Chromium (Debian's package), driven by Playwright.

Slow (a server and a browser start): ``pip install -e ".[browser]"``, ``apt-get install chromium``, then
``pytest -m slow tests/test_browser.py``. With ``RRM_SCREENSHOTS=docs/img`` it also writes the pages it saw there.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from _helpers import mlflow_server_process, tiny_train_args
from click.testing import CliRunner
from mlflow import MlflowClient

from rrm.cli import cli
from rrm.tracking.runs import DEFAULT_EXPERIMENT
from rrm.tracking.views import view_url

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what a root user on a machine with no network needs (a fresh profile, no background calls to Google's hosts)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no Chromium (apt-get install chromium)"),
]


def rrm(*args: object):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_the_runs_view_and_the_teacher_page_show_robust_accuracy(mlflow_store: Path):
    """A SAT teacher and a natural student, each evaluated, the teacher registered: the experiment's saved view lists
    the training runs alone, best robust accuracy first, with its number; the teacher's registry page gives its
    robust accuracy with the attack and the image count."""
    playwright = pytest.importorskip("playwright.sync_api", reason='pip install -e ".[browser]"')
    project = mlflow_store.parent
    runs = {"teacher": ("sat", 3), "natural": ("natural", 1)}
    for name, (method, epochs) in runs.items():
        rrm("train", *tiny_train_args(method=method, eps=0.1, epochs=epochs, out_dir=f"runs/{name}"))
        rrm("evaluate", f"runs/{name}/model.pt", "--eps", "0.1", "--attacks", "apgd", "--n-examples", "120")
    rrm("teacher", "register", "runs/teacher/model.pt", "--evaluation", "runs/teacher/eval_metrics.json")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    robust = {
        r.info.run_name: r.data.metrics["robust/headline"]
        for r in client.search_runs([experiment], "tags.`rrm.kind` = 'train'")
    }
    best = max(robust, key=robust.get)
    assert robust[best] > 0.2 and len(robust) == 2, robust

    shots = Path(os.environ.get("RRM_SCREENSHOTS") or project)
    with (
        mlflow_server_process(os.environ["MLFLOW_TRACKING_URI"], project) as (url, _),
        playwright.sync_playwright() as driver,
    ):
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1800, "height": 520})
        page.goto(view_url(url, experiment))
        page.get_by_text("robust/headline").first.wait_for(timeout=120_000)
        page.get_by_text(best).first.wait_for(timeout=60_000)
        page.screenshot(path=shots / "mlflow-robustness-view.png")
        table = page.inner_text("body")
        assert "You're viewing a shared view" in table and "Robustness" in table
        names = [n for n in re.findall(r"^(.+-cnn-digits)$", table, re.M) if n in robust]
        assert names == sorted(robust, key=robust.get, reverse=True), "best robust accuracy first"
        assert f"{robust[best]:.4f}"[:5] in table and "apgd linf" not in table, "training runs only, with numbers"

        page.set_viewport_size({"width": 1800, "height": 1000})
        page.goto(f"{url}/#/models/rrm-teacher/versions/1?workflowType=machine_learning")
        page.get_by_text("adversarial accuracy").first.wait_for(timeout=60_000)
        page.screenshot(path=shots / "mlflow-teacher-version.png")
        card = page.inner_text("body")
        teacher = robust["teacher · sat-cnn-digits"]
        assert f"{100 * teacher:.2f}% (apgd on 120 test images" in card, card
        browser.close()
