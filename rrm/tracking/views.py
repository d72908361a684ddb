"""The experiment's saved view in ``mlflow ui``: the training runs as a leaderboard, robust accuracy first.

MLflow 3's runs table opens with run name, date, dataset, duration and source; each metric is a column a person must
find and tick. MLflow keeps saved views as experiment tags (``mlflow.sharedViewState.<id>``: a name and the view's
state as JSON, the form its own "Save as new view" writes), listed under "Views" above the runs table and opened by
link. rrm saves one, "Robustness", on every experiment it records runs in: training runs only, with method, model,
eps, seed, natural and robust accuracy, AutoAttack, the masking checks and the counted FLOPs, best robust accuracy
first. A view of that id already there is left as it is, so a user's edits to it stay.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote, urlsplit

from rrm.tracking.uri import tracking_uri

__all__ = ["LOCAL_UI", "VIEW_ID", "VIEW_NAME", "ui_address", "view_tag", "view_url"]

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
VIEW_ID = "rrm-robustness"
VIEW_NAME = "Robustness"
_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow 3.17's key for saved views (its UI code, SHARED_VIEW_STATE_TAG)

_COLUMNS = (
    "params.`method`",
    "params.`model`",
    "params.`eps`",
    "params.`seed`",
    "metrics.`natural/accuracy`",
    "metrics.`robust/headline`",
    "metrics.`robust/autoattack`",
    "metrics.`checks/passed`",
    "metrics.`total_flops`",
)


def _state() -> dict:
    """The view as MLflow's runs page saves one (its search facets and table settings)."""
    return {
        "searchFilter": "tags.`rrm.kind` = 'train'",
        "orderByKey": "metrics.`robust/headline`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": list(_COLUMNS),
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def view_tag() -> tuple[str, str]:
    """The experiment tag (key, value) that saves the view."""
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(_state())}
    return _TAG_PREFIX + VIEW_ID, json.dumps(envelope)


def view_url(ui: str, experiment_id: str) -> str:
    """The link that opens the view in ``mlflow ui`` at ``ui`` (``http://127.0.0.1:5000``), in its model-training
    layout rather than the GenAI one a fresh browser starts in."""
    query = f"viewStateShareKey={VIEW_ID}&workflowType=machine_learning"
    return f"{ui.rstrip('/')}/#/experiments/{quote(experiment_id)}/runs?{query}"


def ui_address() -> str:
    """Where the store's UI is: a tracking server's own address (without credentials), else ``mlflow ui``'s."""
    parts = urlsplit(tracking_uri())
    if parts.scheme in ("http", "https") and parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"
    return LOCAL_UI
