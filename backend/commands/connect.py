"""`sam-backend connect --project ID`: register this backend with a Label Studio project, idempotently."""

from __future__ import annotations

import sys

from backend.errors import UnservableConfig
from backend.labelstudio.client import LabelStudioApi
from backend.labelstudio.label_config import parse_label_config, smart_tool_problems
from backend.settings import Settings

NEXT_STEPS = """\
Connected {title!r} ({url}) to project {project} "{project_title}" as ML backend #{ml_id}.
Next, for the annotator:
  1. open a task of the project and turn on "Auto-Annotation" (below the image);
  2. pick the smart keypoint or box tool and a label, then click (Alt-click to exclude) or drag a box;
  3. the mask appears as {outputs}; correct it if needed and submit.
The first click on an image waits for the SAM encoder (~25 s for vit_b on a CPU); later clicks are fast."""


def connect(settings: Settings, project_id: int, url: str, title: str, out=sys.stdout) -> int:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        print("error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (an admin's token) to connect", file=out)
        return 2
    api = LabelStudioApi.from_settings(settings)
    project = api.project(project_id)  # LabelStudioUnavailable names the problem; the CLI reports it
    try:
        problems = smart_tool_problems(project.label_config or "")
    except UnservableConfig as exc:
        print(f"error: project {project_id}'s label config cannot be served: {exc.message}", file=out)
        print("Ready configs that work: label_config/*.xml in this repository.", file=out)
        return 1
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
    outputs = " and ".join(sorted({"a brush mask" if o.kind == "brush" else "polygons" for o in config.outputs}))
    print(NEXT_STEPS.format(title=title, url=url, project=project_id, project_title=project.title,
                            ml_id=backend_id, outputs=outputs), file=out)
    return 0
