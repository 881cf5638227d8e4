"""Settings.from_env(): the only reader of os.environ. Validated once, at start."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from model.checkpoints import OFFICIAL
from model.precision import PRECISIONS as ENCODE_PRECISIONS

MODEL_TYPES = tuple(OFFICIAL)  # one list: the model types with an official checkpoint
OUTPUT_TYPES = ("both", "brush", "polygon", "bitmask")  # "both": every output tag the config has
ZOOM_EDGES = ("cached", "always", "off")  # which windows may refine a large object's edges
ZOOM_MAXIMA = (1, 2, 4, 8)  # window zooms are powers of two, so windows snap to one grid
PRELABEL_SEARCHES = ("coarse", "grid")  # model.automatic.SEARCHES, named here so settings need no torch

# every environment variable the backend reads; README.md documents each (a test checks both)
ENV_VARS = (
    "SAM_MODEL_TYPE", "SAM_CHECKPOINT", "DEVICE", "REDIS_URL", "CACHE_REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
    "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "MODEL_DIR", "LOG_LEVEL", "HOST", "PORT", "WORKERS", "THREADS",
    "TORCH_THREADS", "ALLOWED_IMAGE_HOSTS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "IMAGE_TIMEOUT",
    "EMBEDDING_TTL", "EMBEDDING_LRU_SIZE", "URL_DIGEST_TTL", "OUTPUT_TYPE", "POLYGON_TOLERANCE",
    "POLYGON_MIN_AREA", "POLYGON_MAX_VERTICES", "POLYGON_MAX_PARTS", "PRELABEL_ON_PREDICT",
    "EMBEDDED_REDIS_MAXMEMORY", "WARM_WORKERS",
    "PRELABEL_LABEL", "PRELABEL_MIN_AREA", "PRELABEL_POINTS_PER_SIDE", "PRELABEL_SEARCH", "PREFETCH_TASKS",
    "HEADS_DIR", "HEAD_RELOAD_SECONDS", "TRAIN_AFTER_ANNOTATIONS", "TRAIN_STEPS", "TRAIN_MARGIN",
    "TRAIN_MIN_CORRECTIONS", "TRAIN_TIMEOUT", "JOB_MAX_RETRIES", "MAX_REQUEST_BYTES", "REQUEST_READ_TIMEOUT", "MAX_TASKS_PER_REQUEST",
    "WEBHOOK_SECRET", "METRICS_AUTH", "MAX_CONCURRENT_ENCODES", "ENCODE_WAIT", "ENCODE_BATCH_SIZE", "ENCODE_PRECISION",
    "ZOOM_THRESHOLD", "ZOOM_MAX", "ZOOM_MAX_WINDOWS", "ZOOM_MIN_SIDE", "ZOOM_EDGES", "WARM_WINDOWS", "PRELABEL_TILES",
)


class SettingsError(ValueError):
    """An environment variable has a value the backend cannot use."""


@dataclasses.dataclass(frozen=True)
class Settings:
    sam_model_type: str = "vit_b"
    sam_checkpoint: str | None = None
    device: str = "auto"
    redis_url: str | None = None  # the job store: queues, job records, heartbeats (never evicted)
    cache_redis_url: str | None = None  # the embedding cache (evictable); None: the same Redis as redis_url
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    model_dir: Path = Path.home() / ".cache" / "sam-backend"
    log_level: str = "INFO"
    host: str = "0.0.0.0"
    port: int = 9090
    workers: int = 1
    threads: int = 4
    torch_threads: int = 0
    allowed_image_hosts: tuple[str, ...] = ()
    max_image_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 120_000_000
    image_timeout: float = 30.0
    embedding_ttl: int = 7 * 24 * 3600
    embedding_lru_size: int = 8
    url_digest_ttl: int = 600
    output_type: str = "both"
    polygon_tolerance: float = 1.0
    polygon_min_area: int = 100
    # what Label Studio's page can draw (issue 13: 193 KB of polygons took 11-46 s to show, 2,000
    # regions 35-52 s). Its time goes per region, not per vertex: measured in the page
    # (tests/e2e/probe_page_cost.py), ~8-12 ms of main-thread CPU per region it adds or removes (an
    # answer replaces the previous one's), no measurable cost per vertex. A click is one object:
    # SAM's mask of one object has one part, or a few where something occludes it; more are specks.
    # A smooth object's outline needs well under 100 vertices: only ragged answers reach that bound
    polygon_max_vertices: int = 1000  # all polygons of one answer together; 0: no bound
    polygon_max_parts: int = 5  # the largest parts of one mask; a draft's objects share them; 0: no bound
    prelabel_on_predict: bool = True
    embedded_redis_maxmemory: str = "2gb"
    warm_workers: int = 1
    prelabel_label: str | None = None
    prelabel_min_area: float = 0.05
    prelabel_points_per_side: int = 16
    prelabel_search: str = "coarse"  # model.automatic: coarse to fine, skipping points inside found masks; or "grid"
    prefetch_tasks: int = 3
    heads_dir: Path | None = None  # None: MODEL_DIR/heads
    head_reload_seconds: float = 2.0
    train_after_annotations: int = 25
    train_steps: int = 250
    train_margin: float = 1.0
    train_min_corrections: int = 8
    train_timeout: int = 3600
    job_max_retries: int = 2  # a job whose worker died is queued again this many times, then fails
    max_request_bytes: int = 64 * 1024 * 1024
    request_read_timeout: float = 60.0  # seconds a request has, from its first byte, to arrive whole (then 408)
    max_tasks_per_request: int = 1000  # jobs one webhook or batch /predict may queue
    webhook_secret: str | None = None
    metrics_auth: bool = False
    max_concurrent_encodes: int = 1  # per process: each takes GBs of memory and every core
    encode_wait: float = 60.0  # seconds a click waits for an encode slot or another process's encode
    # images a warm / pre-label job encodes in one forward pass (GPU workers: 8); 1 keeps one job per image
    encode_batch_size: int = 1
    encode_precision: str = "auto"  # the encoder's dtype: auto (fp16/bf16 on CUDA where the masks hold), fp32, ...
    zoom_threshold: float = 0.25  # prompts spanning at most this fraction of the long side get a zoom window; 0: off
    zoom_max: int = 4  # a window sees at most this many times finer than the encoder's native resolution
    zoom_max_windows: int = 32  # windows one click may decode (a long crack, a large object's edges)
    zoom_min_side: int = 2048  # images shorter than this on their long side keep the whole-image path
    zoom_edges: str = "cached"  # large objects' edges from native windows: cached ones only, always, or off
    warm_windows: bool = False  # warming (warm, prefetch, webhooks) embeds the native window grid too
    prelabel_tiles: bool = True  # drafts of images >= zoom_min_side are made tile by tile

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()

        def text(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        def number(name: str, default, kind=int, minimum=None):
            raw = text(name, None)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if minimum is not None and value < minimum:
                raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = text(name, None)
            if raw is None:
                return default
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"{name}={raw!r} must be true or false")

        model_type = text("SAM_MODEL_TYPE", d.sam_model_type).lower()
        if model_type not in MODEL_TYPES:
            raise SettingsError(f"SAM_MODEL_TYPE={model_type!r} must be one of {', '.join(MODEL_TYPES)}")
        output_type = text("OUTPUT_TYPE", d.output_type).lower()
        if output_type not in OUTPUT_TYPES:
            raise SettingsError(f"OUTPUT_TYPE={output_type!r} must be one of {', '.join(OUTPUT_TYPES)}")
        prelabel_search = text("PRELABEL_SEARCH", d.prelabel_search).lower()
        encode_precision = text("ENCODE_PRECISION", d.encode_precision).lower()
        if encode_precision not in ENCODE_PRECISIONS:
            raise SettingsError(f"ENCODE_PRECISION={encode_precision!r} must be one of {', '.join(ENCODE_PRECISIONS)}")
        if prelabel_search not in PRELABEL_SEARCHES:
            raise SettingsError(f"PRELABEL_SEARCH={prelabel_search!r} must be one of {', '.join(PRELABEL_SEARCHES)}")
        zoom_edges = text("ZOOM_EDGES", d.zoom_edges).lower()
        if zoom_edges not in ZOOM_EDGES:
            raise SettingsError(f"ZOOM_EDGES={zoom_edges!r} must be one of {', '.join(ZOOM_EDGES)}")
        zoom_max = number("ZOOM_MAX", d.zoom_max, minimum=1)
        if zoom_max not in ZOOM_MAXIMA:
            raise SettingsError(f"ZOOM_MAX={zoom_max} must be one of {', '.join(map(str, ZOOM_MAXIMA))}")
        zoom_threshold = number("ZOOM_THRESHOLD", d.zoom_threshold, kind=float, minimum=0.0)
        if zoom_threshold > 1:
            raise SettingsError(f"ZOOM_THRESHOLD={zoom_threshold:g} is a fraction of the image's long side: 0 to 1")
        device = text("DEVICE", d.device).lower()
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise SettingsError(f"DEVICE={device!r} must be auto, cpu, cuda or cuda:N")

        ls_url = text("LABEL_STUDIO_URL", None)
        if ls_url is not None:
            ls_url = ls_url.rstrip("/")
            if urlsplit(ls_url).scheme not in ("http", "https") or not urlsplit(ls_url).hostname:
                raise SettingsError(f"LABEL_STUDIO_URL={ls_url!r} must be an http(s) URL")
        hosts = tuple(h.strip().lower() for h in env.get("ALLOWED_IMAGE_HOSTS", "").split(",") if h.strip())

        def secret(name: str) -> str | None:
            # sent or compared as header text: a byte the environment could not decode (a lone
            # surrogate) or a control character would fail every request that uses it, with a 500
            value = text(name, None)
            if value is not None and not (value.isprintable() and value.isascii()):
                raise SettingsError(f"{name} must be printable ASCII text")
            return value

        user, password = secret("BASIC_AUTH_USER"), secret("BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if flag("METRICS_AUTH", d.metrics_auth) and user is None:
            raise SettingsError("METRICS_AUTH=true protects /metrics with basic auth: set BASIC_AUTH_USER and BASIC_AUTH_PASS")

        return cls(
            sam_model_type=model_type,
            sam_checkpoint=text("SAM_CHECKPOINT", None),
            device=device,
            redis_url=text("REDIS_URL", None),
            cache_redis_url=text("CACHE_REDIS_URL", None),
            label_studio_url=ls_url,
            label_studio_api_key=secret("LABEL_STUDIO_API_KEY"),
            basic_auth_user=user,
            basic_auth_pass=password,
            model_dir=Path(text("MODEL_DIR", str(d.model_dir))).expanduser(),
            log_level=text("LOG_LEVEL", d.log_level).upper(),
            host=text("HOST", d.host),
            port=number("PORT", d.port, minimum=1),
            workers=number("WORKERS", d.workers, minimum=1),
            threads=number("THREADS", d.threads, minimum=1),
            torch_threads=number("TORCH_THREADS", d.torch_threads, minimum=0),
            allowed_image_hosts=hosts,
            max_image_bytes=number("MAX_IMAGE_BYTES", d.max_image_bytes, minimum=1),
            max_image_pixels=number("MAX_IMAGE_PIXELS", d.max_image_pixels, minimum=1),
            image_timeout=number("IMAGE_TIMEOUT", d.image_timeout, kind=float, minimum=0.1),
            embedding_ttl=number("EMBEDDING_TTL", d.embedding_ttl, minimum=0),
            embedding_lru_size=number("EMBEDDING_LRU_SIZE", d.embedding_lru_size, minimum=0),
            url_digest_ttl=number("URL_DIGEST_TTL", d.url_digest_ttl, minimum=0),
            output_type=output_type,
            polygon_tolerance=number("POLYGON_TOLERANCE", d.polygon_tolerance, kind=float, minimum=0.0),
            polygon_min_area=number("POLYGON_MIN_AREA", d.polygon_min_area, minimum=0),
            polygon_max_vertices=number("POLYGON_MAX_VERTICES", d.polygon_max_vertices, minimum=0),
            polygon_max_parts=number("POLYGON_MAX_PARTS", d.polygon_max_parts, minimum=0),
            prelabel_on_predict=flag("PRELABEL_ON_PREDICT", d.prelabel_on_predict),
            embedded_redis_maxmemory=text("EMBEDDED_REDIS_MAXMEMORY", d.embedded_redis_maxmemory),
            warm_workers=number("WARM_WORKERS", d.warm_workers, minimum=0),
            prelabel_label=text("PRELABEL_LABEL", None),
            prelabel_min_area=number("PRELABEL_MIN_AREA", d.prelabel_min_area, kind=float, minimum=0.0),
            prelabel_points_per_side=number("PRELABEL_POINTS_PER_SIDE", d.prelabel_points_per_side, minimum=1),
            prelabel_search=prelabel_search,
            prefetch_tasks=number("PREFETCH_TASKS", d.prefetch_tasks, minimum=0),
            heads_dir=Path(heads_dir).expanduser() if (heads_dir := text("HEADS_DIR", None)) else None,
            head_reload_seconds=number("HEAD_RELOAD_SECONDS", d.head_reload_seconds, kind=float, minimum=0.0),
            train_after_annotations=number("TRAIN_AFTER_ANNOTATIONS", d.train_after_annotations, minimum=0),
            train_steps=number("TRAIN_STEPS", d.train_steps, minimum=1),
            train_margin=number("TRAIN_MARGIN", d.train_margin, kind=float, minimum=0.0),
            train_min_corrections=number("TRAIN_MIN_CORRECTIONS", d.train_min_corrections, minimum=2),
            train_timeout=number("TRAIN_TIMEOUT", d.train_timeout, minimum=60),
            job_max_retries=number("JOB_MAX_RETRIES", d.job_max_retries, minimum=0),
            max_request_bytes=number("MAX_REQUEST_BYTES", d.max_request_bytes, minimum=1024),
            request_read_timeout=number("REQUEST_READ_TIMEOUT", d.request_read_timeout, kind=float, minimum=0.1),
            max_tasks_per_request=number("MAX_TASKS_PER_REQUEST", d.max_tasks_per_request, minimum=1),
            webhook_secret=secret("WEBHOOK_SECRET"),
            metrics_auth=flag("METRICS_AUTH", d.metrics_auth),
            max_concurrent_encodes=number("MAX_CONCURRENT_ENCODES", d.max_concurrent_encodes, minimum=1),
            encode_wait=number("ENCODE_WAIT", d.encode_wait, kind=float, minimum=0.0),
            encode_batch_size=number("ENCODE_BATCH_SIZE", d.encode_batch_size, minimum=1),
            encode_precision=encode_precision,
            zoom_threshold=zoom_threshold,
            zoom_max=zoom_max,
            zoom_max_windows=number("ZOOM_MAX_WINDOWS", d.zoom_max_windows, minimum=1),
            zoom_min_side=number("ZOOM_MIN_SIDE", d.zoom_min_side, minimum=1),
            zoom_edges=zoom_edges,
            warm_windows=flag("WARM_WINDOWS", d.warm_windows),
            prelabel_tiles=flag("PRELABEL_TILES", d.prelabel_tiles),
        )

    @property
    def head_registry_dir(self) -> Path:
        return self.heads_dir or self.model_dir / "heads"

    @property
    def cache_url(self) -> str | None:
        return self.cache_redis_url or self.redis_url

    @property
    def basic_auth_enabled(self) -> bool:
        return self.basic_auth_user is not None

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)
