"""The MLflow Model Registry: a run's logged model registered as a version of a named model, once.

Registered through ``MlflowClient`` with explicit ids (``create_registered_model``, ``create_model_version``
with the run's MLflow 3 logged model): what ``mlflow.register_model("runs:/RUN/model", NAME)`` does, without
its global tracking URI. ``mlflow.pytorch.load_model("models:/NAME/latest")`` loads the newest version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ablate.errors import AblateError
from ablate.tracking.client import MODEL, Tracker


@dataclass(frozen=True)
class Version:
    """A registered model version: its name, number, the run it came from, and whether this call made it."""

    name: str
    version: str
    run_id: str
    created: bool

    @property
    def uri(self) -> str:
        """The version's model URI."""
        return f"models:/{self.name}/{self.version}"


def logged_model_id(tracker: Tracker, run_id: str, name: str = MODEL) -> str:
    """The id of a run's logged model ``name`` (its validation-selected weights)."""
    run = tracker.client.get_run(run_id)
    found = tracker.client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    if not ready:
        raise AblateError(f"MLflow run {run_id} has no logged model {name!r} to register (it ended before its model "
                          "was logged); train it again")
    return str(max(ready, key=lambda m: m.creation_timestamp).model_id)


def register(tracker: Tracker, name: str, run_id: str, *, tags: Mapping[str, str], description: str) -> Version:
    """Register ``run_id``'s model as a version of ``name``, with ``tags`` and ``description``.

    A run is registered once per name: a version of the same run is updated (its tags and description), not
    registered again, so re-running what chose it adds no version.
    """
    from mlflow.exceptions import MlflowException

    client = tracker.client
    try:
        for v in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
            for tag, value in tags.items():
                if v.tags.get(tag) != value:
                    client.set_model_version_tag(name, v.version, tag, value)
            if v.description != description:
                client.update_model_version(name, v.version, description=description)
            return Version(name, str(v.version), run_id, False)
        model_id = logged_model_id(tracker, run_id)
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        v = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                        tags=dict(tags), description=description, model_id=model_id)
    except MlflowException as e:
        raise AblateError(f"cannot register model {name!r} in {tracker.shown_uri}: {str(e).splitlines()[0]}") from None
    return Version(name, str(v.version), run_id, True)
