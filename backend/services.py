"""Services: everything a request, a job or a command works with, built once per process from the
settings (the web app, each RQ worker and the CLI build it the same way) and passed in, never
reached through a module global."""

from __future__ import annotations

import dataclasses
import logging

import redis

from backend.jobs.queues import BackgroundJobs, job_counts, store_risks
from backend.jobs.training import acceptance_rows
from backend.labelstudio.client import LabelStudioApi
from backend.metrics import Metrics
from backend.pipeline.embeddings import Embedder, EmbeddingCache
from backend.pipeline.heads import ServingHeads
from backend.pipeline.images import ImageFetcher, same_origin
from backend.pipeline.model_loader import ModelLoader
from backend.pipeline.predict import Predictor
from backend.settings import Settings
from model.registry import HeadRegistry

log = logging.getLogger(__name__)

_SETUP_KEY = "sam-backend:setup"


@dataclasses.dataclass
class Services:
    settings: Settings
    metrics: Metrics
    redis: redis.Redis | None  # the job store (queues, job records, setup): never the evictable cache
    loader: ModelLoader
    cache: EmbeddingCache
    fetcher: ImageFetcher
    embedder: Embedder
    heads: ServingHeads
    predictor: Predictor
    background: BackgroundJobs

    @classmethod
    def build(cls, settings: Settings, loader: ModelLoader | None = None) -> "Services":
        metrics = Metrics()
        # Redis has two roles: the job store (REDIS_URL: queues, job records, heartbeats, /setup,
        # training counters; must never evict) and the embedding cache (CACHE_REDIS_URL: embeddings,
        # image copies, URL digests, encode claims; evicts). Only the cache client goes to the
        # EmbeddingCache; everything else gets the store's. Short timeouts: an unreachable Redis
        # must cost a click milliseconds, not seconds.
        client = cache_client = None
        if settings.redis_url:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        if settings.cache_url:
            cache_client = client if settings.cache_url == settings.redis_url else redis.Redis.from_url(
                settings.cache_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        if client is not None:
            for risk in store_risks(client, shares_cache=cache_client is client):
                log.warning("%s", risk)
        else:
            log.warning("REDIS_URL is not set: no background jobs%s",
                        "" if cache_client else "; embeddings are cached in this process only")
        loader = loader or ModelLoader(settings)
        cache = EmbeddingCache(cache_client, metrics, settings.embedding_ttl, settings.embedding_lru_size,
                               settings.url_digest_ttl)
        fetcher = ImageFetcher(settings)
        embedder = Embedder(settings, loader, cache, fetcher, metrics)
        heads = ServingHeads(HeadRegistry(settings.head_registry_dir), lambda: loader.model_id, metrics,
                             settings.head_reload_seconds)
        predictor = Predictor(settings, loader, embedder, metrics, heads)
        background = BackgroundJobs(client, loader, settings, metrics)
        if client is not None:
            metrics.watch_queues(lambda: job_counts(client))
            metrics.watch_acceptance(lambda: acceptance_rows(client))
        return cls(settings, metrics, client, loader, cache, fetcher, embedder, heads, predictor, background)

    def setup_accepted(self, hostname: str) -> bool:
        """Whether /setup may tell this backend where Label Studio is and which token to use.

        /setup decides where downloads go and what token they carry, so it must not come from just
        anyone who can reach the port: its values are taken when basic auth is on (the caller
        proved it is the Label Studio the admin connected), or when its hostname is the very
        LABEL_STUDIO_URL the admin configured (then it can only supply the token for it).
        """
        if self.settings.basic_auth_enabled:
            return True
        configured = self.settings.label_studio_url
        return configured is not None and same_origin(hostname, configured)

    def share_setup(self, hostname: str, token: str) -> None:
        """Take /setup's Label Studio address and token (when accepted) and leave them in Redis for
        the other workers and machines that did not see this call."""
        if not self.setup_accepted(hostname):
            log.warning("ignoring /setup's hostname and token: without basic auth only LABEL_STUDIO_URL's own origin "
                        "is taken from /setup (set LABEL_STUDIO_URL, or BASIC_AUTH_USER/PASS)")
            return
        self.fetcher.remember_setup(hostname, token)
        if self.redis is None:
            return
        try:
            self.redis.hset(_SETUP_KEY, mapping={"hostname": hostname, "access_token": token})
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not share /setup through Redis: %s", exc)

    def load_shared_setup(self) -> None:
        """Label Studio's address and token from another worker's /setup, when none is known here."""
        if self.redis is None or self.fetcher.has_label_studio():
            return
        try:
            shared = self.redis.hgetall(_SETUP_KEY)
        except redis.RedisError as exc:
            self.metrics.redis_errors.inc()
            log.warning("could not read the shared /setup from Redis: %s", exc)
            return
        if shared and self.setup_accepted(shared[b"hostname"].decode()):
            self.fetcher.remember_setup(shared[b"hostname"].decode(), shared[b"access_token"].decode())

    def label_studio_api(self) -> LabelStudioApi:
        """Label Studio's API with the configured credentials, else those from /setup."""
        self.load_shared_setup()
        ls = self.fetcher.label_studio()
        if ls is None:
            return LabelStudioApi.from_settings(self.settings)  # raises, naming the variables to set
        return LabelStudioApi(ls.base_url, ls.api_key)
