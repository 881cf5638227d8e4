"""What the backend reads and writes in a project: the image field, prompt tags, output tags, labels."""

from __future__ import annotations

import dataclasses
import functools

from label_studio_sdk.label_interface import LabelInterface

from backend.errors import UnservableConfig

PROMPT_TAGS = {"KeyPointLabels": "keypointlabels", "RectangleLabels": "rectanglelabels"}
OUTPUT_TAGS = {"BrushLabels": "brush", "PolygonLabels": "polygon", "BitmaskLabels": "bitmask"}
# each kind's region type in a Label Studio result; its labels go under value[region type]
REGION_TYPES = {"brush": "brushlabels", "polygon": "polygonlabels", "bitmask": "bitmasklabels"}
PIXEL_KINDS = ("brush", "bitmask")  # the mask as it is, at full resolution (polygons are traced from it)


@dataclasses.dataclass(frozen=True)
class OutputTag:
    name: str  # from_name
    kind: str  # "brush" | "polygon" | "bitmask"
    labels: tuple[str, ...]

    @property
    def region_type(self) -> str:
        return REGION_TYPES[self.kind]


@dataclasses.dataclass(frozen=True)
class ProjectConfig:
    image_name: str  # to_name
    image_field: str  # key in task["data"]
    prompt_tags: tuple[str, ...]
    outputs: tuple[OutputTag, ...]
    all_labels: tuple[str, ...]

    def outputs_for(self, label: str, output_type: str) -> list[OutputTag]:
        """The output tags a region of `label` is written to: with OUTPUT_TYPE "both", every output tag
        of the config; with one kind (brush, polygon, bitmask), the tags of that kind when the config has
        one, else every output tag (a config with only polygons still answers with polygons)."""
        kinds = {o.kind for o in self.outputs}
        wanted = kinds if output_type == "both" or output_type not in kinds else {output_type}
        chosen = [o for o in self.outputs if o.kind in wanted and label in o.labels]
        if not chosen:
            names = ", ".join(f"{o.name} ({', '.join(o.labels)})" for o in self.outputs if o.kind in wanted)
            raise UnservableConfig(
                f"label {label!r} is not in any output tag ({names}); add <Label value={label!r}/> to it"
            )
        return chosen

    def default_label(self) -> str:
        return self.outputs[0].labels[0]


MAX_LABEL_CONFIG_CHARS = 256_000  # real configs are a few KB; the cache below holds at most 32 of these


def parse_label_config(config: str) -> ProjectConfig:
    """Parse and check a label config; UnservableConfig names what is missing."""
    if not isinstance(config, str):
        raise UnservableConfig("the project's label config is not text")
    if len(config) > MAX_LABEL_CONFIG_CHARS:
        raise UnservableConfig(f"the label config has {len(config)} characters; at most {MAX_LABEL_CONFIG_CHARS} "
                               "are accepted")
    return _parse_label_config(config)


@functools.lru_cache(maxsize=32)
def _parse_label_config(config: str) -> ProjectConfig:
    """Cached: every /predict carries the config, and parsing it costs milliseconds."""
    if not config or not config.strip():
        raise UnservableConfig("the project has no label config")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises lxml, pydantic and its own errors for bad XML
        raise UnservableConfig(f"cannot parse the label config: {exc}") from exc

    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise UnservableConfig("the label config has no <Image> tag: SAM needs an image to segment")
    image = images[0]
    if not str(image.value).startswith("$"):
        raise UnservableConfig(f"<Image name={image.name!r}> must take its value from task data, like value=\"$image\"")

    def targets_image(control) -> bool:
        return image.name in (control.to_name or [])

    prompts = tuple(c.name for c in interface.controls if c.tag in PROMPT_TAGS and targets_image(c))
    outputs = tuple(
        OutputTag(c.name, OUTPUT_TAGS[c.tag], tuple(c.labels or ()))
        for c in interface.controls
        if c.tag in OUTPUT_TAGS and targets_image(c)
    )
    if not outputs:
        raise UnservableConfig(
            f"the label config has no <BrushLabels>, <PolygonLabels> or <BitmaskLabels> tag with toName={image.name!r}: "
            "add one so the backend has somewhere to put the mask"
        )
    empty = [o.name for o in outputs if not o.labels]
    if empty:
        raise UnservableConfig(f"output tag(s) {', '.join(empty)} have no <Label> children")
    labels = tuple(dict.fromkeys(label for o in outputs for label in o.labels))
    return ProjectConfig(image.name, str(image.value)[1:], prompts, outputs, labels)


def smart_tool_problems(config_xml: str) -> list[str]:
    """What keeps annotators from using the smart tools with this config, each with the fix (empty: fine)."""
    config = parse_label_config(config_xml)  # raises UnservableConfig with the first blocking problem
    problems = []
    if not config.prompt_tags:
        problems.append(
            f'no smart tool: add <KeyPointLabels name="kp" toName="{config.image_name}" smart="true"> and/or '
            f'<RectangleLabels name="box" toName="{config.image_name}" smart="true"> with the same labels as the output tag'
        )
    interface = LabelInterface(config_xml)
    for name in config.prompt_tags:
        control = interface.get_control(name)
        if str(control.attr.get("smart", "")).lower() != "true" and str(control.attr.get("smartOnly", "")).lower() != "true":
            problems.append(f'<{control.tag} name="{name}"> is not a smart tool: add smart="true" to it')
        for label in control.labels or ():
            if not any(label in o.labels for o in config.outputs):
                problems.append(
                    f"label {label!r} of <{control.tag} name=\"{name}\"> is in no output tag: add "
                    f"<Label value={label!r}/> to {', '.join(o.name for o in config.outputs)}"
                )
    return problems
