"""Image embeddings: the Embedder (cache hit, or download + decode + encode once) and the EmbeddingCache
under it (Redis, shared by every worker and machine, behind a small in-process LRU).

Stored as fp16, byte-shuffled (high bytes together compress far better) and zstd-compressed,
with the sizes needed to map coordinates. Never pickled: a cache entry is data we parse.
A Redis outage is logged and counted, and the click goes on without the cache.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import struct
import threading
import time
import uuid

import cv2
import numpy as np
import redis
import zstandard

from backend.errors import Busy
from backend.metrics import Metrics
from backend.pipeline.images import ImageFetcher, decode_image
from backend.pipeline.model_loader import ModelLoader
from backend.pipeline.timings import Timings
from backend.settings import Settings

log = logging.getLogger(__name__)

_MAGIC = b"SAMEMB1\0"
_HEADER = struct.Struct("<8sHHHIIII")  # magic, C, H, W, original h, w, input h, w
_PREFIX = "sam-backend"


class CorruptEmbedding(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Embedding:
    features: np.ndarray  # float32 (C, H, W), already rounded through fp16
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @classmethod
    def quantized(cls, features: np.ndarray, original_size, input_size) -> "Embedding":
        """Round through fp16 now, so a fresh embedding and a cached one give the very same masks."""
        return cls(features.astype(np.float16).astype(np.float32), tuple(original_size), tuple(input_size))


def serialize(embedding: Embedding, level: int = 1) -> bytes:
    c, h, w = embedding.features.shape
    half = np.ascontiguousarray(embedding.features, dtype=np.float16)
    shuffled = half.view(np.uint8).reshape(-1, 2).T.tobytes()
    header = _HEADER.pack(_MAGIC, c, h, w, *embedding.original_size, *embedding.input_size)
    return header + zstandard.ZstdCompressor(level=level).compress(shuffled)


def deserialize(blob: bytes) -> Embedding:
    try:
        magic, c, h, w, oh, ow, ih, iw = _HEADER.unpack_from(blob)
    except struct.error as exc:
        raise CorruptEmbedding(f"short header: {exc}") from exc
    if magic != _MAGIC:
        raise CorruptEmbedding("not a sam-backend embedding")
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob[_HEADER.size :], max_output_size=c * h * w * 2)
    except zstandard.ZstdError as exc:
        raise CorruptEmbedding(f"cannot decompress: {exc}") from exc
    if len(raw) != c * h * w * 2:
        raise CorruptEmbedding(f"expected {c * h * w * 2} bytes, got {len(raw)}")
    half = np.frombuffer(raw, dtype=np.uint8).reshape(2, -1).T.copy().view(np.float16)
    return Embedding(half.reshape(c, h, w).astype(np.float32), (oh, ow), (ih, iw))


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    def __init__(
        self,
        client: redis.Redis | None,
        metrics: Metrics,
        ttl: int = 7 * 24 * 3600,
        lru_size: int = 8,
        url_digest_ttl: int = 600,
        retry_after: float = 5.0,
    ):
        self.client = client
        self.metrics = metrics
        self.ttl = ttl or None
        self.url_digest_ttl = url_digest_ttl
        self._lru: collections.OrderedDict[str, Embedding] = collections.OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()
        self._urls: dict[str, tuple[str, float]] = {}
        # after a Redis failure, skip it for a few seconds: every click would otherwise wait for a timeout
        self._retry_after = retry_after
        self._down_until = 0.0

    @staticmethod
    def key(model_id: str, digest: str) -> str:
        return f"{_PREFIX}:emb:{model_id}:{digest}"

    @classmethod
    def window_key(cls, model_id: str, digest: str, window: str) -> str:
        """A zoom window's embedding (model.windows.Window.key names the window): beside its image's."""
        return f"{cls.key(model_id, digest)}:win:{window}"

    def has(self, key: str) -> bool:
        """Whether an embedding is cached (here or in Redis), without fetching it."""
        with self._lock:
            if key in self._lru:
                return True
        return bool(self._redis("EXISTS", lambda c: c.exists(key)))

    def get(self, key: str) -> Embedding | None:
        with self._lock:
            found = self._lru.get(key)
            if found is not None:
                self._lru.move_to_end(key)
        if found is not None:
            self.metrics.cache.labels("hit_local").inc()
            return found
        blob = self._redis("GET", lambda c: c.get(key))
        if blob is None:
            self.metrics.cache.labels("miss").inc()
            return None
        try:
            embedding = deserialize(blob)
        except CorruptEmbedding as exc:
            log.warning("dropping corrupt cache entry %s: %s", key, exc)
            self.metrics.cache.labels("corrupt").inc()
            self._redis("DEL", lambda c: c.delete(key))
            return None
        self.metrics.cache.labels("hit_redis").inc()
        self._remember(key, embedding)
        return embedding

    def put(self, key: str, embedding: Embedding) -> None:
        self._remember(key, embedding)
        blob = serialize(embedding)
        self.metrics.cache_bytes.observe(len(blob))
        self._redis("SET", lambda c: c.set(key, blob, ex=self.ttl))

    def put_image(self, digest: str, image: np.ndarray) -> None:
        """The encoder-input image (JPEG), for the refinement head: it looks at pixels, not only the embedding."""
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise ValueError("cannot encode the input image as JPEG")
        self._redis("SET", lambda c: c.set(self._image_key(digest), jpeg.tobytes(), ex=self.ttl))

    def get_image(self, digest: str) -> np.ndarray | None:
        blob = self._redis("GET", lambda c: c.get(self._image_key(digest)))
        if blob is None:
            return None
        decoded = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            log.warning("dropping a corrupt cached input image %s", digest[:12])
            self._redis("DEL", lambda c: c.delete(self._image_key(digest)))
            return None
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

    @staticmethod
    def _image_key(digest: str) -> str:
        return f"{_PREFIX}:img:{digest}"

    def claim(self, key: str, ttl: float = 15.0) -> "EncodeClaim | None":
        """Claim the encode of `key` for this process: None while another holder's claim is alive.
        The claim is refreshed while held, so it lapses within `ttl` seconds of its holder dying.
        Without Redis every caller gets a claim (nothing to share with)."""
        token = uuid.uuid4().hex
        name = f"{key}:encoding"
        taken = self._redis("SET", lambda c: c.set(name, token, nx=True, px=int(ttl * 1000)))
        if taken is None and self.client is not None and time.monotonic() >= self._down_until:
            return None  # another process holds it
        return EncodeClaim(self, name, token, ttl)

    def url_digest(self, url: str) -> str | None:
        """The content digest last seen for an image URL, so a warm click needs no download."""
        if not self.url_digest_ttl:
            return None
        now = time.monotonic()
        with self._lock:
            local = self._urls.get(url)
        if local is not None and local[1] > now:
            return local[0]
        found = self._redis("GET", lambda c: c.get(self._url_key(url)))
        if found is None:
            return None
        digest = found.decode()
        with self._lock:
            self._urls[url] = (digest, now + self.url_digest_ttl)
        return digest

    def remember_url(self, url: str, digest: str) -> None:
        if not self.url_digest_ttl:
            return
        with self._lock:
            if len(self._urls) > 10_000:
                self._urls.clear()
            self._urls[url] = (digest, time.monotonic() + self.url_digest_ttl)
        self._redis("SET", lambda c: c.set(self._url_key(url), digest, ex=self.url_digest_ttl))

    @staticmethod
    def _url_key(url: str) -> str:
        return f"{_PREFIX}:url:{hashlib.sha256(url.encode()).hexdigest()}"

    def _remember(self, key: str, embedding: Embedding) -> None:
        if self._lru_size <= 0:
            return
        with self._lock:
            self._lru[key] = embedding
            self._lru.move_to_end(key)
            while len(self._lru) > self._lru_size:
                self._lru.popitem(last=False)

    def _redis(self, what: str, call):
        if self.client is None or time.monotonic() < self._down_until:
            return None
        try:
            return call(self.client)
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + self._retry_after
            self.metrics.redis_errors.inc()
            log.warning("Redis %s failed (%s); going on without the shared cache for %.0f s", what, exc, self._retry_after)
            return None


class EncodeClaim:
    """A held claim on an encode (see EmbeddingCache.claim): refreshed by a thread until released."""

    def __init__(self, cache: EmbeddingCache, name: str, token: str, ttl: float):
        self.cache, self.name, self.token, self.ttl = cache, name, token, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="encode-claim", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.cache._redis("PEXPIRE", lambda c: c.pexpire(self.name, int(self.ttl * 1000)))

    def release(self) -> None:
        self._stop.set()
        # delete only our own claim (a lapsed one may have been taken over since)
        self.cache._redis("EVAL", lambda c: c.eval(_RELEASE, 1, self.name, self.token))


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Embedder:
    """Embedding for an image URL: from the cache, or downloaded and encoded once (per process, per image)."""

    def __init__(self, settings: Settings, loader: ModelLoader, cache: EmbeddingCache, fetcher: ImageFetcher, metrics: Metrics):
        self.settings = settings
        self.loader = loader
        self.cache = cache
        self.fetcher = fetcher
        self.metrics = metrics
        self._locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._images: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._encode_slots = threading.BoundedSemaphore(settings.max_concurrent_encodes)

    def for_url(self, url: str, timings: Timings | None = None) -> Embedding:
        timings = timings or Timings()
        found = self.cached(url)
        if found is not None:
            return found
        start = time.perf_counter()
        data = self.fetcher.fetch(url)
        timings.add("fetch", time.perf_counter() - start)
        self.metrics.image_fetch.observe(time.perf_counter() - start)
        digest = content_digest(data)
        self.cache.remember_url(url, digest)
        return self.for_bytes(data, digest, timings)

    def cached(self, url: str) -> Embedding | None:
        """The embedding if this image was embedded before, without downloading anything."""
        digest = self.cache.url_digest(url)
        return None if digest is None else self.cache.get(self.cache.key(self.loader.model_id, digest))

    def for_bytes(self, data: bytes, digest: str, timings: Timings) -> Embedding:
        key = self.cache.key(self.loader.model_id, digest)
        return self.shared(key, lambda: self._encode(key, digest, data, timings))

    def shared(self, key: str, encode) -> Embedding:
        """The embedding cached under `key`, else `encode()` (which stores it) run once: once per
        process, once across processes (a claim), within MAX_CONCURRENT_ENCODES. Zoom windows too."""
        found = self.cache.get(key)
        if found is not None:
            return found
        with self._lock_for(key):  # two clicks on a new image must not encode it twice
            embedding = self._shared_or_encoded(key, encode)
        with self._locks_guard:
            self._locks.pop(key, None)
        return embedding

    def _shared_or_encoded(self, key: str, encode) -> Embedding:
        """An encode in flight anywhere (any process, any machine sharing the cache) is waited for, not
        run twice; one whose encoder died (its claim stops being refreshed) is taken over."""
        deadline = time.monotonic() + self.settings.encode_wait
        while True:
            found = self.cache.get(key)
            if found is not None:
                return found
            claim = self.cache.claim(key)
            if claim is not None:
                break
            if time.monotonic() > deadline:
                raise Busy(f"this image is being embedded elsewhere and took longer than ENCODE_WAIT="
                           f"{self.settings.encode_wait:g} s; try again shortly", retry_after=5)
            time.sleep(0.2)
        try:
            # a bounded number of encodes per process: each takes GBs and every core for seconds
            if not self._encode_slots.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise Busy(f"{self.settings.max_concurrent_encodes} image(s) are being embedded in this process "
                           f"(MAX_CONCURRENT_ENCODES); try again shortly", retry_after=5)
            try:
                return encode()
            finally:
                self._encode_slots.release()
        finally:
            claim.release()

    def _encode(self, key: str, digest: str, data: bytes, timings: Timings) -> Embedding:
        model = self.loader.get()
        start = time.perf_counter()
        image = decode_image(data, self.settings.max_image_pixels, model.input_side)
        timings.add("decode_image", time.perf_counter() - start)
        start = time.perf_counter()
        features = model.encode(image.input_image)
        elapsed = time.perf_counter() - start
        timings.add("encode", elapsed)
        self.metrics.encoder.observe(elapsed)
        embedding = Embedding.quantized(features, image.original_size, image.input_size)
        self.cache.put(key, embedding)
        self.cache.put_image(digest, image.input_image)
        return embedding

    def for_urls(self, urls: list[str], timings: list[Timings] | None = None) -> list["Embedding | Exception"]:
        """Embeddings of many images (a batched warm or pre-label job), in order. Those not cached are
        encoded ENCODE_BATCH_SIZE per forward pass, each stored under its own key exactly as `for_url`
        stores it. A failure of one image (download, decode, its encode) is that image's entry, an
        exception naming why; the others go on. Images another process is encoding are waited for, as
        `for_url` waits, after the batch."""
        timings = timings or [Timings() for _ in urls]
        results: list[Embedding | Exception | None] = [None] * len(urls)
        pending, deferred, claims = [], [], []  # (index, key, digest, decoded image), (index, data, digest)
        try:
            model = self.loader.get()
            for i, url in enumerate(urls):
                try:
                    found = self.cached(url)
                    if found is not None:
                        results[i] = found
                        continue
                    start = time.perf_counter()
                    data = self.fetcher.fetch(url)
                    timings[i].add("fetch", time.perf_counter() - start)
                    self.metrics.image_fetch.observe(time.perf_counter() - start)
                    digest = content_digest(data)
                    self.cache.remember_url(url, digest)
                    key = self.cache.key(self.loader.model_id, digest)
                    found = self.cache.get(key)
                    if found is not None:
                        results[i] = found
                        continue
                    claim = self.cache.claim(key)
                    if claim is None:  # being encoded elsewhere: waited for after this batch, not run twice
                        deferred.append((i, data, digest))
                        continue
                    claims.append(claim)
                    start = time.perf_counter()
                    image = decode_image(data, self.settings.max_image_pixels, model.input_side)
                    timings[i].add("decode_image", time.perf_counter() - start)
                    pending.append((i, key, digest, image))
                except Exception as exc:  # this image only (refused, unreadable, too large): the batch goes on
                    results[i] = exc
            size = self.settings.encode_batch_size
            for chunk in [pending[n:n + size] for n in range(0, len(pending), size)]:
                for (i, key, digest, image), features in zip(chunk, self._encode_chunk(model, chunk, timings)):
                    if isinstance(features, Exception):
                        results[i] = features
                        continue
                    embedding = Embedding.quantized(features, image.original_size, image.input_size)
                    self.cache.put(key, embedding)
                    self.cache.put_image(digest, image.input_image)
                    results[i] = embedding
        finally:
            for claim in claims:
                claim.release()
        for i, data, digest in deferred:
            try:
                results[i] = self.for_bytes(data, digest, timings[i])
            except Exception as exc:  # this image only
                results[i] = exc
        return results

    def _encode_chunk(self, model, chunk, timings: list[Timings]) -> list:
        """One forward pass for the chunk; if it fails (out of memory, one odd image), each image alone,
        so one image can fail only itself."""
        with self._encode_slots:  # a job may wait for the slot: nobody is waiting on its answer
            start = time.perf_counter()
            try:
                features = model.encode_batch([image.input_image for _, _, _, image in chunk])
            except Exception as exc:
                if len(chunk) == 1:
                    return [exc]
                log.warning("a batched encode of %d images failed (%s: %s); encoding them one by one",
                            len(chunk), exc.__class__.__name__, exc)
                features = []
                for _, _, _, image in chunk:
                    try:
                        features.append(model.encode(image.input_image))
                    except Exception as one:  # this image only
                        features.append(one)
            share = (time.perf_counter() - start) / len(chunk)
        for i, _, _, _ in chunk:
            timings[i].add("encode", share)
            self.metrics.encoder.observe(share)
        return features

    def input_image(self, url: str) -> np.ndarray:
        """The encoder-input image (RGB, long side the encoder's input side) that the refinement head looks at."""
        digest = self.cache.url_digest(url)
        image = None if digest is None else self._images.get(digest)
        if image is None and digest is not None:
            image = self.cache.get_image(digest)
        if image is None:  # embedded before images were kept, or evicted: download it again
            data = self.fetcher.fetch(url)
            digest = content_digest(data)
            self.cache.remember_url(url, digest)
            image = decode_image(data, self.settings.max_image_pixels, self.loader.get().input_side).input_image
            self.cache.put_image(digest, image)
        with self._locks_guard:
            self._images[digest] = image
            self._images.move_to_end(digest)
            while len(self._images) > 4:
                self._images.popitem(last=False)
        return image

    def _lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[key]
