"""Label Studio's /predict body, parsed once into one typed request that the rest of the path passes along.

Every malformed field is an InvalidRequest naming it; a label config the backend cannot serve is
UnservableConfig. Nothing after this module reads the raw body again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from backend.errors import InvalidRequest
from backend.labelstudio.label_config import ProjectConfig, parse_label_config
from backend.labelstudio.prompts import ClickPrompt, parse_click, task_image_url


@dataclasses.dataclass(frozen=True)
class ClickRequest:
    """An interactive request: one task, the smart regions drawn so far combined into one prompt."""

    task: dict
    config: ProjectConfig
    project_id: int | None
    image_url: str
    click: ClickPrompt


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """"Retrieve predictions" or an opened task: every task gets a draft."""

    tasks: list[dict]
    config: ProjectConfig
    project_id: int | None


def project_number(project: Any) -> int | None:
    """Label Studio sends the project as "<id>.<created timestamp>" (or a bare number)."""
    if isinstance(project, bool) or project is None:
        return None
    head = str(project).split(".", 1)[0]
    # isdecimal, not isdigit: "²" is a digit that int() refuses
    return int(head) if head.isascii() and head.isdecimal() and len(head) <= 12 else None


def parse_predict(body: Any) -> ClickRequest | BatchRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise InvalidRequest("'tasks' must be a list of task objects")
    config_xml = body.get("label_config")
    if not isinstance(config_xml, str):
        raise InvalidRequest("'label_config' must be the project's label config (a string)")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object")
    context = params.get("context")
    if context and (not isinstance(context, dict) or not isinstance(context.get("result"), list)):
        raise InvalidRequest("'params.context' must be an object with a 'result' list")
    if context and len(tasks) != 1:
        raise InvalidRequest(f"an interactive request carries exactly one task, got {len(tasks)}")
    config = parse_label_config(config_xml)
    project_id = project_number(body.get("project"))
    if not context:
        return BatchRequest(tasks, config, project_id)
    task = tasks[0]
    click = parse_click(context["result"], config)
    return ClickRequest(task, config, project_id, task_image_url(task, config), click)
