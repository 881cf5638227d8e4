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
