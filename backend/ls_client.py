"""Label Studio's API, through label-studio-sdk, as plain dicts: projects, tasks, predictions."""

from __future__ import annotations

import json
from typing import Iterator

from backend.errors import InvalidRequest
from backend.settings import Settings


def _plain(obj) -> dict:
    return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)


class LabelStudioApi:
    def __init__(self, base_url: str | None, api_key: str | None):
        if not base_url or not api_key:
            raise InvalidRequest("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to read and write Label Studio projects")
        from label_studio_sdk import LabelStudio

        self.client = LabelStudio(base_url=base_url, api_key=api_key)

    @classmethod
    def from_settings(cls, settings: Settings) -> "LabelStudioApi":
        return cls(settings.label_studio_url, settings.label_studio_api_key)

    def label_config(self, project_id: int) -> str:
        return self.client.projects.get(project_id).label_config or ""

    def tasks(self, project_id: int) -> Iterator[dict]:
        """Every task's id and data (not its predictions or annotations)."""
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
        for task in self.client.tasks.list(project=project_id, query=json.dumps(query), page_size=count,
                                           fields="task_only"):
            found.append({"id": task.id, "data": task.data})
            if len(found) >= count:
                break
        return found

    def annotated_task_ids(self, project_id: int) -> list[int]:
        """Tasks with at least one annotation, oldest first."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]},
            "ordering": ["tasks:id"]}
        return [task.id for task in self.client.tasks.list(project=project_id, query=json.dumps(query),
                                                            fields="task_only")]

    def task(self, task_id: int) -> dict:
        """The task with its data, predictions and annotations (the shape /predict receives)."""
        task = _plain(self.client.tasks.get(str(task_id)))
        task["predictions"] = [_plain(p) for p in self.client.predictions.list(task=task_id)]
        task["annotations"] = [_plain(a) for a in self.client.annotations.list(task_id)]
        return task

    def create_prediction(self, task_id: int, result: list[dict], score: float, model_version: str) -> int:
        created = self.client.predictions.create(task=task_id, result=result, score=score, model_version=model_version)
        return created.id
