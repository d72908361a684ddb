"""Registered models that killed registrations left empty: found and removed by the next command."""

from __future__ import annotations

import contextlib
import json
import time

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from rrm.tracking.stale import process_alive

__all__ = ["ABANDONED_AFTER_S", "CREATING_TAG", "REGISTRY_DESCRIPTION", "remove_abandoned_models"]

REGISTRY_DESCRIPTION = "Adversarially trained teachers registered by rrm."
# A registered model that rrm is creating, until its first version exists: the registering process's tags
# (rrm.tracking.stale's rrm.host, rrm.pid, rrm.process_start) as JSON.
CREATING_TAG = "rrm.creating"
# An empty registered model whose creator cannot be checked (another host, or rrm before the tag) is abandoned after
# this long: a registration takes seconds.
ABANDONED_AFTER_S = 3600


def _creator_gone(tag: str) -> bool:
    """Whether the process an ``rrm.creating`` tag names is known to have ended (it ran on this host and is gone)."""
    try:
        process = json.loads(tag)
    except ValueError:
        return False
    return isinstance(process, dict) and process_alive(process) is False


def _abandoned(model: RegisteredModel) -> bool:
    """Whether an rrm registered model without versions was left by a registration that will never finish."""
    tags = model.tags or {}
    if model.latest_versions or (CREATING_TAG not in tags and model.description != REGISTRY_DESCRIPTION):
        return False
    old = time.time() * 1000 - (model.creation_timestamp or 0) > ABANDONED_AFTER_S * 1000
    return old or _creator_gone(tags.get(CREATING_TAG, ""))


def _registered_models(client: MlflowClient, filter_string: str | None = None) -> list[RegisteredModel]:
    found, token = [], None
    while True:
        page = client.search_registered_models(filter_string, max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def remove_abandoned_models(client: MlflowClient) -> None:
    """Delete the empty registered models that killed registrations left, and drop the creation tag of any whose
    registration was killed after its first version. Best effort: a store that refuses (permissions, a concurrent
    cleanup) leaves them for the next command."""
    for model in _registered_models(client, f"tags.`{CREATING_TAG}` LIKE '%'"):
        if model.latest_versions:
            with contextlib.suppress(MlflowException):
                client.delete_registered_model_tag(model.name, CREATING_TAG)
    for model in _registered_models(client):
        if _abandoned(model) and not client.search_model_versions(f"name = '{model.name}'", max_results=1):
            with contextlib.suppress(MlflowException):
                client.delete_registered_model(model.name)
