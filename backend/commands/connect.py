"""`sam-backend connect --project ID`: register this backend with a Label Studio project, idempotently,
and say what would still keep its masks from the annotator (refused image hosts, drafts hidden
behind another model version's predictions)."""

from __future__ import annotations

import sys
from collections import Counter

from backend.errors import BackendError, HostNotAllowed, UnservableConfig
from backend.labelstudio.client import LabelStudioApi
from backend.labelstudio.label_config import ProjectConfig, parse_label_config, smart_tool_problems
from backend.labelstudio.prompts import task_image_url
from backend.pipeline.images import ImageFetcher
from backend.settings import Settings

NEXT_STEPS = """\
Connected {title!r} ({url}) to project {project} "{project_title}" as ML backend #{ml_id}.
Next, for the annotator:
  1. open a task of the project and turn on "Auto-Annotation" (below the image);
  2. pick the smart keypoint or box tool and a label, then click (Alt-click to exclude) or drag a box;
  3. the mask appears as {outputs}; correct it if needed and submit.
The first click on an image waits for the SAM encoder (~25 s for vit_b on a CPU); later clicks are fast."""

MAX_SCANNED_TASKS = 10_000  # image hosts are read from this many tasks at most: a check, not an export


def config_problems(label_config: str) -> list[str]:
    """Everything in a label config that keeps the smart tools from working, each with its fix (empty: fine)."""
    try:
        return smart_tool_problems(label_config or "")
    except UnservableConfig as exc:
        return [f"{exc.message} (ready configs that work: label_config/*.xml in this repository)"]


def refused_image_hosts(settings: Settings, tasks, config: ProjectConfig) -> dict[str, tuple[int, str]]:
    """{host:port: (tasks, the backend's refusal)} for the tasks whose image the backend would refuse
    to download (ALLOWED_IMAGE_HOSTS, Label Studio's origin), read from the URLs alone."""
    fetcher = ImageFetcher(settings)
    counts: Counter = Counter()
    reasons: dict[str, str] = {}
    for n, task in enumerate(tasks):
        if n >= MAX_SCANNED_TASKS:
            break
        try:
            fetcher.resolve(task_image_url(task, config))
        except HostNotAllowed as exc:
            where = exc.message.split(" is not allowed")[0].removeprefix("downloading images from ")
            counts[where] += 1
            reasons[where] = exc.message
        except BackendError as exc:  # no image field, a relative URL without LABEL_STUDIO_URL, ...
            counts[exc.message] += 1
            reasons[exc.message] = exc.message
    return {where: (count, reasons[where]) for where, count in counts.most_common()}


def hidden_drafts(api: LabelStudioApi, project, backend: dict) -> str | None:
    """Why the editor would not pre-fill our drafts, or None. Label Studio pre-fills a task with the
    predictions of the project's model version: a prediction's version (an importer's `detector-v1`
    sets it when the project has none) or an ML backend's title (the backend's live version)."""
    shown = project.model_version or ""
    ours = {backend.get("title") or "", backend.get("model_version") or ""}
    others = {v: n for v, n in api.prediction_versions(project.id).items() if v not in ours}
    if not project.show_collab_predictions:
        return ('"Use predictions to prelabel tasks" is off for the project: the editor pre-fills no draft '
                "(run connect with --show-our-drafts, or Settings -> Annotation -> Prelabeling)")
    if shown in ours:
        return None
    listed = ", ".join(f"{v} ({n} predictions)" for v, n in sorted(others.items())) or "none"
    return (f"the project's model version is {shown!r}, so the editor pre-fills that version's predictions and "
            f"our SAM drafts stay a second tab (prediction versions in the project: {listed}); run connect with "
            f"--show-our-drafts to show {backend.get('title')!r}'s drafts instead (Settings -> Annotation -> "
            "Prelabeling, by hand)")


def connect(settings: Settings, project_id: int, url: str, title: str, out=sys.stdout,
            show_our_drafts: bool = False) -> int:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (an admin's token) to connect", file=out)
        return 2
    api = LabelStudioApi.from_settings(settings)
    project = api.project(project_id)  # LabelStudioUnavailable names the problem; the CLI reports it
    problems = config_problems(project.label_config or "")
    if problems:
        print(f"error: project {project_id}'s label config needs changes before the smart tools work:", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        return 1

    options = dict(url=url, title=title, is_interactive=True)
    if settings.basic_auth_enabled:
        options.update(auth_method="BASIC_AUTH", basic_auth_user=settings.basic_auth_user,
                       basic_auth_pass=settings.basic_auth_pass)
    else:
        options.update(auth_method="NONE")
    backend_id = api.register_backend(project_id, **options)
    config = parse_label_config(project.label_config)
    described = {"brush": "a brush mask", "polygon": "polygons", "bitmask": "a bitmask (PNG) mask"}
    outputs = " and ".join(sorted({described[o.kind] for o in config.outputs}))
    print(NEXT_STEPS.format(title=title, url=url, project=project_id, project_title=project.title,
                            ml_id=backend_id, outputs=outputs), file=out)

    for where, (count, reason) in refused_image_hosts(settings, api.tasks(project_id), config).items():
        print(f"warning: {count} task(s) have images the backend will refuse: {reason}", file=out)
    backend = next(m for m in api.ml_backends(project_id) if m["id"] == backend_id)
    project = api.project(project_id)  # connecting may have set its model version
    why = hidden_drafts(api, project, backend)
    if why and show_our_drafts:
        api.show_predictions_of(project_id, backend["title"])
        print(f"The editor now pre-fills tasks with {backend['title']!r}'s drafts (model version "
              f"{backend.get('model_version')}) instead of {project.model_version or 'none'!r}.", file=out)
    elif why:
        print(f"note: {why}", file=out)
    return 0
