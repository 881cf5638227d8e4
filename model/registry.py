"""Head checkpoints per project: versioned, written atomically, with a "current" pointer.

    HEADS_DIR/project-7/v0003/head.pt     state dict (read back with weights_only=True)
    HEADS_DIR/project-7/v0003/meta.json   metrics, training config, base model, sha256 of head.pt, verdict
    HEADS_DIR/project-7/current           "v0003": the version served (absent: plain SAM)
    HEADS_DIR/project-7/history.jsonl     every change of the pointer: promote, rollback

A version directory is written under a temporary name and renamed into place, and the pointer
is replaced with os.replace: a reader sees a whole version or none, the old pointer or the new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from model.files import write_atomic
from model.refine import HeadConfig, RefineHead

_VERSION = re.compile(r"^v(\d{4,})$")


class HeadError(ValueError):
    """A head checkpoint that cannot be served: missing, corrupt, or made for another base model."""


@dataclasses.dataclass(frozen=True)
class HeadVersion:
    project: int
    version: str
    meta: dict

    @property
    def promoted(self) -> bool:
        return self.meta.get("status") == "promoted"


class HeadRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def project_dir(self, project: int) -> Path:
        return self.root / f"project-{int(project)}"

    def versions(self, project: int) -> list[HeadVersion]:
        found = []
        directory = self.project_dir(project)
        if not directory.is_dir():
            return found
        for child in sorted(directory.iterdir()):
            if _VERSION.match(child.name) and (child / "meta.json").is_file():
                try:
                    meta = json.loads((child / "meta.json").read_text())
                except (OSError, ValueError) as exc:
                    meta = {"status": "unreadable", "reason": str(exc)}
                found.append(HeadVersion(project, child.name, meta))
        return found

    def save(self, project: int, head: RefineHead, meta: dict) -> HeadVersion:
        """Store a new version (promoted or not); returns it. Never overwrites an existing version."""
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(head.state_dict(), buffer)
        blob = buffer.getvalue()
        for _ in range(100):
            numbers = [int(_VERSION.match(p.name).group(1)) for p in directory.iterdir() if _VERSION.match(p.name)]
            version = f"v{max(numbers, default=0) + 1:04d}"
            meta = {**meta, "version": version, "project": int(project), "created": time.time(),
                    "head_config": head.config.to_dict(), "sha256": hashlib.sha256(blob).hexdigest(),
                    "parameters": head.parameter_count()}
            staging = Path(tempfile.mkdtemp(dir=directory, prefix=".staging-"))
            (staging / "head.pt").write_bytes(blob)
            (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            try:
                os.rename(staging, directory / version)  # fails if another trainer took this number
            except OSError:
                shutil.rmtree(staging)
                continue
            return HeadVersion(project, version, meta)
        raise HeadError(f"could not allocate a version number in {directory}")

    def current(self, project: int) -> str | None:
        try:
            version = (self.project_dir(project) / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def set_current(self, project: int, version: str | None, why: str) -> None:
        """Point the project at `version` (None: plain SAM). Checks the version loads first."""
        if version is not None:
            self.load(project, version)
        directory = self.project_dir(project)
        directory.mkdir(parents=True, exist_ok=True)
        previous = self.current(project)
        write_atomic(directory / "current", (version or "").encode())
        with open(directory / "history.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), "from": previous, "to": version, "why": why}) + "\n")

    def meta(self, project: int, version: str) -> dict:
        path = self.project_dir(project) / version / "meta.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise HeadError(f"project {project} has no head {version}") from None
        except (OSError, ValueError) as exc:
            raise HeadError(f"head {version} of project {project}: unreadable meta.json: {exc}") from exc

    def load(self, project: int, version: str, base_model_id: str | None = None) -> RefineHead:
        """The head, checked: sha256, architecture, finite weights, and (if given) the base model it was trained on."""
        if not _VERSION.match(version or ""):
            raise HeadError(f"{version!r} is not a head version (like v0003)")
        meta = self.meta(project, version)
        if base_model_id is not None and meta.get("base_model_id") != base_model_id:
            raise HeadError(f"head {version} of project {project} was trained on base {meta.get('base_model_id')}, "
                            f"this backend serves {base_model_id}")
        path = self.project_dir(project) / version / "head.pt"
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise HeadError(f"head {version} of project {project}: {exc}") from exc
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise HeadError(f"head {version} of project {project} is corrupt: sha256 does not match meta.json")
        try:
            config = HeadConfig.from_dict(meta.get("head_config", {}))
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            head = RefineHead(config)
            head.load_state_dict(state, strict=True)
        except Exception as exc:  # torch raises many types for foreign or mismatched files
            raise HeadError(f"head {version} of project {project} cannot be loaded: {exc}") from exc
        if not all(torch.isfinite(p).all() for p in head.state_dict().values()):
            raise HeadError(f"head {version} of project {project} has non-finite weights")
        return head.eval()
