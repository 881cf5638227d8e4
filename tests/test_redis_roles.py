"""The two roles of Redis: the job store never loses a queued job or record, however full the
embedding cache gets (issue 11, finding 1), with the Redis instances `sam-backend serve` starts."""

from __future__ import annotations

import numpy as np
import redis

from backend.jobs import queues
from backend.metrics import Metrics
from backend.pipeline.embeddings import Embedding, EmbeddingCache
from backend.web.embedded_redis import EmbeddedRedis, start_embedded


def test_a_full_cache_evicts_embeddings_and_no_queued_job(tmp_path):
    store, cache = start_embedded(tmp_path / "redis", "40mb")
    try:
        jobs_db = redis.Redis.from_url(store.url)
        for i in range(400):
            assert queues.enqueue_warm(jobs_db, "vit_b-test", [f"/data/upload/{i}.png"]) == 1
        embeddings = EmbeddingCache(redis.Redis.from_url(cache.url), Metrics(), lru_size=0)
        rng = np.random.default_rng(0)
        for i in range(60):  # ~1.2 MB each after compression: 72 MB into a 40 MB cache
            features = rng.standard_normal((256, 64, 64)).astype(np.float32)
            embeddings.put(f"sam-backend:emb:vit_b-test:{i:064d}", Embedding.quantized(features, (800, 1280), (640, 1024)))
        cached = redis.Redis.from_url(cache.url).dbsize()
        assert 0 < cached < 60  # the cache evicted the oldest embeddings
        assert queues.queue(jobs_db).count == 400  # every queued job is still there
        assert len(jobs_db.keys("rq:job:*")) == 400  # and every job record
        assert queues.store_risks(jobs_db, shares_cache=False) == []
    finally:
        store.stop()
        cache.stop()


def test_one_lru_redis_for_both_roles_is_reported_as_a_risk(tmp_path):
    # the old set-up: one allkeys-lru Redis for jobs and embeddings lost every queued job this way
    single = EmbeddedRedis(tmp_path / "one", maxmemory="40mb", name="both").start()
    try:
        risks = queues.store_risks(redis.Redis.from_url(single.url), shares_cache=True)
        assert len(risks) == 1 and "allkeys-lru" in risks[0] and "CACHE_REDIS_URL" in risks[0]
    finally:
        single.stop()
