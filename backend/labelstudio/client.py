"""Label Studio's API, through label-studio-sdk, as plain dicts: projects, tasks, predictions.

The one place where the SDK's errors become ours: every call that fails (wrong project id,
revoked token, Label Studio down) raises LabelStudioUnavailable naming the call and the server.
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from backend.errors import LabelStudioUnavailable, NotConfigured
from backend.settings import Settings

_HINTS = {
    401: "LABEL_STUDIO_API_KEY was refused: use a valid legacy token or personal access token",
    403: "the user of LABEL_STUDIO_API_KEY may not see it",
    404: "it does not exist (check the id)",
}


def _plain(obj) -> dict:
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


class LabelStudioApi:
    def __init__(self, base_url: str | None, api_key: str | None):
        if not base_url or not api_key:
            raise NotConfigured("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read and write Label Studio projects")
        self.base_url = base_url
        self.client = LabelStudio(base_url=base_url, api_key=api_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> "LabelStudioApi":
        return cls(settings.label_studio_url, settings.label_studio_api_key)

    @contextlib.contextmanager
    def _calling(self, what: str):
        try:
            yield
        except ApiError as exc:
            hint = _HINTS.get(exc.status_code, "")
            raise LabelStudioUnavailable(
                f"Label Studio at {self.base_url} answered HTTP {exc.status_code} for {what}"
                + (f": {hint}" if hint else "")) from None
        except httpx.HTTPError as exc:
            raise LabelStudioUnavailable(
                f"cannot reach Label Studio at {self.base_url} for {what}: {exc.__class__.__name__}") from None

    def project(self, project_id: int):
        with self._calling(f"project {project_id}"):
            return self.client.projects.get(project_id)

    def label_config(self, project_id: int) -> str:
        return self.project(project_id).label_config or ""

    def tasks(self, project_id: int) -> Iterator[dict]:
        """Every task's id and data (not its predictions or annotations)."""
        with self._calling(f"the tasks of project {project_id}"):
            for task in self.client.tasks.list(project=project_id, fields="task_only"):
                yield {"id": task.id, "data": task.data}

    def task_ids(self, project_id: int) -> list[int]:
        return [task["id"] for task in self.tasks(project_id)]

    def next_tasks(self, project_id: int, after_task_id: int, count: int) -> list[dict]:
        """The `count` tasks after this one in id order: what an annotator opens next in the default queue."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after_task_id}]},
            "ordering": ["tasks:id"]}
        found = []
        with self._calling(f"the tasks after task {after_task_id} of project {project_id}"):
            for task in self.client.tasks.list(project=project_id, query=json.dumps(query), page_size=count,
                                               fields="task_only"):
                found.append({"id": task.id, "data": task.data})
                if len(found) >= count:
                    break
        return found

    def tasks_by_id(self, project_id: int, task_ids: list[int], batch: int = 200) -> list[dict]:
        """These tasks' ids and data as Label Studio has them: ids that are not tasks of this project
        are left out. Read `batch` ids a call (the ids travel in the query string)."""
        found = []
        with self._calling(f"{len(task_ids)} tasks of project {project_id}"):
            for start in range(0, len(task_ids), batch):
                wanted = set(task_ids[start:start + batch])
                query = {"selectedItems": {"all": False, "included": sorted(wanted)}}
                seen = 0
                for task in self.client.tasks.list(project=project_id, query=json.dumps(query),
                                                   page_size=len(wanted), fields="task_only"):
                    if task.id in wanted:
                        found.append({"id": task.id, "data": task.data})
                    seen += 1
                    if seen >= len(wanted):  # never walk a whole project, whatever the server answers
                        break
        return found

    def annotated_task_ids(self, project_id: int) -> list[int]:
        """Tasks with at least one annotation, oldest first."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]},
            "ordering": ["tasks:id"]}
        with self._calling(f"the annotated tasks of project {project_id}"):
            return [task.id for task in self.client.tasks.list(project=project_id, query=json.dumps(query),
                                                                fields="task_only")]

    def task(self, task_id: int) -> dict:
        """The task with its data, predictions and annotations (the shape /predict receives)."""
        with self._calling(f"task {task_id}"):
            task = _plain(self.client.tasks.get(str(task_id)))
            task["predictions"] = [_plain(p) for p in self.client.predictions.list(task=task_id)]
            task["annotations"] = [_plain(a) for a in self.client.annotations.list(task_id)]
        return task

    def create_prediction(self, task_id: int, result: list[dict], score: float, model_version: str) -> int:
        with self._calling(f"a new prediction of task {task_id}"):
            created = self.client.predictions.create(task=task_id, result=result, score=score,
                                                     model_version=model_version)
        return created.id

    def register_backend(self, project_id: int, **options) -> int:
        """Connect the ML backend at options["url"] to the project, or update the one already there.
        Returns its id."""
        url = options["url"]
        with self._calling(f"the ML backends of project {project_id}"):
            existing = [m for m in self.client.ml.list(project=project_id)
                        if (m.url or "").rstrip("/") == url.rstrip("/")]
        with self._calling(f"registering the backend at {url} (Label Studio must be able to reach that URL; for a "
                           "backend on a local address start Label Studio with LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false "
                           "and LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false)"):
            if existing:
                return self.client.ml.update(existing[0].id, project=project_id, **options).id
            return self.client.ml.create(project=project_id, **options).id

    def ml_backends(self, project_id: int) -> list[dict]:
        """The ML backends connected to the project, as Label Studio last saw them."""
        with self._calling(f"the ML backends of project {project_id}"):
            return [_plain(m) for m in self.client.ml.list(project=project_id)]

    def checked_ml_backend(self, ml_id: int) -> dict:
        """The ML backend after Label Studio's own check of it: reading one makes Label Studio call the
        backend's /health, then /setup, and store the outcome (readable_state "Connected", or
        "Disconnected" / "Error" with error_message), as its Settings -> Model page does."""
        with self._calling(f"ML backend {ml_id}"):
            return _plain(self.client.ml.get(ml_id))

    def interactive(self, ml_id: int, task_id: int, context: dict, timeout: float) -> dict:
        """What Label Studio answers the labeling page for a smart-tool click: {"data": result} or
        {"errors": [...]}, both with HTTP 200 (the page shows neither)."""
        with self._calling(f"an interactive prediction of task {task_id} through ML backend {ml_id}"):
            raw = self.client.ml.with_raw_response.predict_interactive(
                ml_id, task=task_id, context=context, request_options={"timeout_in_seconds": timeout})
            return raw.response.json()

    def first_task(self, project_id: int) -> dict | None:
        """The project's first task (id order) with its data, or None when it has none."""
        with self._calling(f"the first task of project {project_id}"):
            for task in self.client.tasks.list(project=project_id, page_size=1, fields="task_only"):
                return {"id": task.id, "data": task.data}
        return None

    def prediction_versions(self, project_id: int) -> dict[str, int]:
        """{model version: predictions} over the project's tasks (Label Studio's model-versions call,
        which the SDK does not wrap)."""
        with self._calling(f"the prediction model versions of project {project_id}"):
            response = self.client._client_wrapper.httpx_client.request(
                f"api/projects/{int(project_id)}/model-versions/", method="GET")
            if response.status_code != 200:
                raise ApiError(status_code=response.status_code, body=response.text)
            return {str(k): int(v) for k, v in response.json().items()}

    def show_predictions_of(self, project_id: int, model_version: str) -> None:
        """What Label Studio's editor pre-fills a task with: the predictions of `model_version`, which
        is a prediction's version or an ML backend's title (its live version), with "Use predictions
        to prelabel tasks" on (Settings -> Annotation -> Prelabeling in the page)."""
        with self._calling(f"the model version of project {project_id}"):
            self.client.projects.update(project_id, model_version=model_version, show_collab_predictions=True)
