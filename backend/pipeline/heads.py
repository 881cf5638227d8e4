"""The refinement head each project is served with, reloaded live when its "current" pointer moves.

Every serving process (web worker, RQ worker, any machine sharing HEADS_DIR) reads the pointer at
most once per HEAD_RELOAD_SECONDS per project, so a promotion or a rollback reaches every click
within seconds and without a restart. A head that fails its checks is refused: the head that
was serving before (or plain SAM) goes on serving, and the error is logged and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from model.refine import RefineHead
from model.registry import HeadError, HeadRegistry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServedHead:
    project: int
    version: str
    head: RefineHead

    @property
    def model_version_suffix(self) -> str:
        return f"+head-p{self.project}-{self.version}"


class ServingHeads:
    def __init__(self, registry: HeadRegistry, base_model_id, metrics, check_every: float = 2.0):
        self.registry = registry
        self._base_model_id = base_model_id  # () -> str: the SAM this process serves
        self.metrics = metrics
        self.check_every = check_every
        self._served: dict[int, ServedHead | None] = {}
        self._checked: dict[int, float] = {}
        self._pointer: dict[int, str | None] = {}
        self._lock = threading.Lock()

    def for_project(self, project: int | None) -> ServedHead | None:
        if project is None:
            return None
        now = time.monotonic()
        if now - self._checked.get(project, -1e9) < self.check_every:
            return self._served.get(project)
        with self._lock:
            if now - self._checked.get(project, -1e9) >= self.check_every:
                self._refresh(project)
                self._checked[project] = time.monotonic()
        return self._served.get(project)

    def _refresh(self, project: int) -> None:
        try:
            pointer = self.registry.current(project)
        except OSError as exc:
            log.warning("cannot read the head pointer of project %s: %s", project, exc)
            return
        if pointer == self._pointer.get(project, "<unread>"):
            return
        self._pointer[project] = pointer
        if pointer is None:
            if self._served.get(project) is not None:
                log.info("project %s: serving plain SAM (head pointer cleared)", project)
            self._served[project] = None
            return
        try:
            head = self.registry.load(project, pointer, self._base_model_id())
        except HeadError as exc:
            self.metrics.head_load_errors.inc()
            kept = self._served.get(project)
            log.error("project %s: refusing head %s (%s); still serving %s", project, pointer, exc,
                      kept.version if kept else "plain SAM")
            return
        self._served[project] = ServedHead(project, pointer, head)
        log.info("project %s: now serving refinement head %s", project, pointer)
