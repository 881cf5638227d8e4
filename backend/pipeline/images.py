"""Fetch image bytes (Label Studio token, host allowlist, size limits, timeouts) and decode them."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.cookiejar
import io
import json
import logging
import re
import socket
import threading
import time
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_errors
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import HostNotAllowed, ImageTooLarge, ImageUnavailable, InvalidRequest, NotConfigured, UnsupportedInput
from backend.settings import Settings
from model.prompts import preprocess_shape
from model.sam import IMAGE_SIZE

log = logging.getLogger(__name__)
# urllib3's DEBUG lines carry each request's full path and query: presigned signatures, and
# whatever a malformed URL holds. Our own messages show URLs through display_url instead.
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)

Image.MAX_IMAGE_PIXELS = None  # we check the pixel count ourselves, with a clear error


_SECRET_PARAM = re.compile(r"(?i)(sig|signature|token|key|credential|secret|password|auth)")


# "user:password@" anywhere: a malformed URL ("http:/u:p@h", "http:\\u:p@h") hides its userinfo
# from urlsplit, yet the password in it is still a password. The password runs to the last "@"
# before the path, as the HTTP client reads it ("u:p@q@h": the password is "p@q")
_USERINFO = re.compile(r"[^/\\@\s?#]*:[^/\\\s?#]*@")


def display_url(url: str) -> str:
    """The URL for messages and logs: presigned URLs carry credentials in the query string, and
    a URL may carry a password before its host."""
    return _USERINFO.sub("***@", _masked_query(url))


def _masked_query(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is not None or (parts.username is not None and "@" in parts.netloc):
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    url = parts.geturl()
    if not parts.query:
        return url
    query = "&".join(
        f"{name}=***" if _SECRET_PARAM.search(name) else f"{name}={value}"
        for name, _, value in (pair.partition("=") for pair in parts.query.split("&"))
    )
    return parts._replace(query=query).geturl()


_MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) that the HTTP client will really connect to.

    Read with the client's own parser (requests prepares the URL, urllib3 parses it), and
    cross-checked with urlsplit: a URL the two read differently (a backslash before "@", odd
    userinfo) could pass the allowlist as one host and be fetched from another, carrying Label
    Studio's token there. Such URLs are refused, as are control characters and bad ports.
    """
    if "\\" in url or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequest(f"image URL {display_url(url)!r} contains a backslash or a control character")
    try:
        prepared = requests.Request("GET", url).prepare().url or ""
        parsed = parse_url(prepared)
        split = urlsplit(url)
        split_port = split.port
        split_host = (split.hostname or "").lower()
        if not split_host.isascii():  # requests sends international names IDNA-encoded
            split_host = split_host.encode("idna").decode()
    except (requests.RequestException, LocationParseError, ValueError, UnicodeError) as exc:
        raise InvalidRequest(f"image URL {display_url(url)!r} cannot be parsed: {exc.__class__.__name__}") from None
    scheme = (parsed.scheme or "").lower()
    default = 443 if scheme == "https" else 80
    host, port = (parsed.host or "").lower().strip("[]"), parsed.port or default
    other = (split_host, split_port or default)
    if other != (host, port):
        raise InvalidRequest(f"image URL {display_url(url)!r} is ambiguous: it names {other[0]}:{other[1]} "
                             f"but would connect to {host}:{port}")
    return scheme, host, port


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs reach the same scheme, host and port (False when either cannot be parsed)."""
    try:
        return _origin(a.rstrip("/")) == _origin(b.rstrip("/"))
    except InvalidRequest:
        return False


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _jwt_expiry(token: str) -> float:
    """Expiry claim of a JWT we received from Label Studio (not verified: we only schedule a refresh)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError):
        return time.time() + 240


class LabelStudioAuth:
    """Authorization headers for Label Studio: legacy tokens as `Token`, personal access tokens
    exchanged at /api/token/refresh/ for a short-lived access token sent as `Bearer`."""

    def __init__(self, base_url: str | None, api_key: str | None, session: requests.Session, timeout: float):
        self.base_url = base_url
        self.api_key = api_key
        self._session = session
        self._timeout = timeout
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None

    def header(self, force_refresh: bool = False) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not _looks_like_jwt(self.api_key):
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or self._access[1] - 30 < time.time():
                self._access = self._refresh()
            return {"Authorization": f"Bearer {self._access[0]}"}

    def _refresh(self) -> tuple[str, float]:
        url = urljoin(self.base_url + "/", "api/token/refresh/")
        try:
            response = self._session.post(url, json={"refresh": self.api_key}, timeout=self._timeout)
        except requests.RequestException as exc:
            raise ImageUnavailable(f"cannot reach Label Studio at {display_url(self.base_url)} to refresh the access "
                                   f"token: {exc.__class__.__name__}")
        if response.status_code != 200:
            raise ImageUnavailable(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY "
                f"(HTTP {response.status_code} from /api/token/refresh/): create a new one in Account & Settings"
            )
        access = response.json().get("access")
        if not isinstance(access, str):
            raise ImageUnavailable("Label Studio's /api/token/refresh/ answered without an access token")
        return access, _jwt_expiry(access)


# ---------------------------------------------------------------- the whole-download deadline
# requests' timeouts bound each socket read, not a download: a host sending one header or body byte
# a second holds a thread for as long as it likes. So each download registers the connections it
# uses, and a timer shuts their sockets down when IMAGE_TIMEOUT is up; the blocked read then fails.

_watched = threading.local()  # .conns: the connections of the download running on this thread


class _Watched:
    """Registers itself with the current thread's download when it connects or sends a request
    (a pooled connection is reused without connecting again)."""

    def connect(self):
        _watch(self)
        super().connect()

    def request(self, *args, **kwargs):
        _watch(self)
        return super().request(*args, **kwargs)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


def _watch(conn) -> None:
    conns = getattr(_watched, "conns", None)
    if conns is not None:
        conns.append(conn)


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with connections a deadline can cut (also through an HTTP proxy)."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:  # not SOCKS
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager


@contextlib.contextmanager
def _cut_at(deadline: float):
    """Within this block, the connections this thread uses are shut down at `deadline`. Yields an
    Event set when that happened: a cut can look like a complete answer (headers end at EOF, a
    body without Content-Length too), so the caller must not trust what it read then."""
    conns: list = []
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        for conn in list(conns):
            sock = conn.sock
            if sock is not None:
                try:  # the plain socket's shutdown, also under TLS: the reading thread owns the TLS state
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    _watched.conns = conns
    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), cut)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()
        _watched.conns = None


def download_session() -> requests.Session:
    """The HTTP session for image downloads: connections a deadline can cut, and no cookie jar (a
    cookie ignores ports, so one Label Studio set would go to every other port on its host, and one
    an image host set would come back to Label Studio)."""
    session = requests.Session()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = _DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class ImageFetcher:
    def __init__(self, settings: Settings, session: requests.Session | None = None):
        self.settings = settings
        self._session = session or download_session()
        self._configured = LabelStudioAuth(
            settings.label_studio_url, settings.label_studio_api_key, self._session, settings.image_timeout
        )
        self._from_setup: LabelStudioAuth | None = None

    def remember_setup(self, hostname: str | None, access_token: str | None) -> None:
        """Label Studio's /setup tells us its address and a token: the fallback when none is configured."""
        if not hostname or not access_token or not same_origin(hostname, hostname):  # unparsable: ignored
            return
        if urlsplit(hostname).scheme in ("http", "https"):
            self._from_setup = LabelStudioAuth(
                hostname.rstrip("/"), access_token, self._session, self.settings.image_timeout
            )

    def has_label_studio(self) -> bool:
        return bool(self.settings.label_studio_url) or self._from_setup is not None

    def label_studio(self) -> LabelStudioAuth | None:
        if self.settings.label_studio_url:
            if self._configured.api_key or self._from_setup is None:
                return self._configured
            if same_origin(self._from_setup.base_url, self.settings.label_studio_url):
                return self._from_setup  # same server, token only from /setup
            return self._configured
        return self._from_setup

    def resolve(self, url: str) -> tuple[str, LabelStudioAuth | None]:
        """Absolute URL to download and the Label Studio auth to send with it (None: send no credentials)."""
        ls = self.label_studio()
        if url.startswith("//"):
            # a network-path reference: the annotator's browser reads "//host/a.png" as another host
            url = (urlsplit(ls.base_url).scheme if ls is not None else "https") + ":" + url
        elif url.startswith("/"):
            if ls is None:
                raise NotConfigured(
                    f"image URL {display_url(url)} is relative to Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
                )
            url = ls.base_url + url
        scheme, host, port = _origin(url)
        if scheme not in ("http", "https"):
            raise UnsupportedInput(
                f"image URL scheme {scheme or display_url(url)[:32]!r} is not supported: serve images over http(s) "
                "or through Label Studio (cloud storage with presigned URLs, local files, uploads)"
            )
        same_as_ls = ls is not None and (scheme, host, port) == _origin(ls.base_url)
        allowed = self.settings.allowed_image_hosts
        if not (same_as_ls or "*" in allowed or host in allowed):
            raise HostNotAllowed(
                f"downloading images from {host}:{port} is not allowed; add {host} to ALLOWED_IMAGE_HOSTS "
                f"(allowed now: {', '.join(allowed) or 'the Label Studio origin only'})"
            )
        # credentials go only to Label Studio itself, never to third-party hosts
        return url, (ls if same_as_ls else None)

    def fetch(self, url: str) -> bytes:
        """The image's bytes. IMAGE_TIMEOUT bounds the whole download, redirects included; every
        redirect hop is checked against the allowlist like the first URL, and Label Studio's
        credentials go only to hops on Label Studio's own origin."""
        deadline = time.monotonic() + self.settings.image_timeout
        with _cut_at(deadline) as cut:
            try:
                data = self._fetch(url, deadline)
            except ImageUnavailable:
                if cut.is_set():
                    self._raise_late(url)
                raise
            if cut.is_set():
                self._raise_late(url)
            return data

    def _fetch(self, url: str, deadline: float) -> bytes:
        shown = display_url(url)
        for _ in range(_MAX_REDIRECTS + 1):
            absolute, auth = self.resolve(url)
            response = self._get(absolute, auth, False, deadline)
            if response.status_code == 401 and auth is not None and auth.api_key and _looks_like_jwt(auth.api_key):
                response.close()
                response = self._get(absolute, auth, True, deadline)
            if response.status_code not in _REDIRECTS or not response.headers.get("Location"):
                break
            response.close()
            url = urljoin(absolute, response.headers["Location"])
        else:
            raise ImageUnavailable(f"downloading {shown} was redirected more than {_MAX_REDIRECTS} times")
        with response:
            if response.status_code in (401, 403):
                raise ImageUnavailable(
                    f"Label Studio answered {response.status_code} for {shown}: set LABEL_STUDIO_API_KEY to a "
                    "valid legacy token or personal access token of a user who can see this project"
                )
            if response.status_code != 200:
                raise ImageUnavailable(f"downloading {shown} failed with HTTP {response.status_code}")
            return self._read_body(response, shown, deadline)

    def _read_body(self, response: requests.Response, shown: str, deadline: float) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("Content-Length") or "0"
        if declared.isdigit() and int(declared) > limit:
            raise ImageTooLarge(f"image {shown} is {declared} bytes; MAX_IMAGE_BYTES is {limit}")
        chunks, size = [], 0
        try:
            while True:
                # read1: whatever has arrived, so a server trickling bytes cannot outlast the deadline
                chunk = response.raw.read1(1 << 20, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise ImageTooLarge(f"image {shown} is larger than MAX_IMAGE_BYTES={limit}")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise ImageUnavailable(
                        f"downloading {shown} took longer than IMAGE_TIMEOUT={self.settings.image_timeout} s")
        except (requests.RequestException, urllib3_errors.HTTPError, OSError) as exc:
            self._raise_if_late(shown, deadline)
            raise ImageUnavailable(f"downloading {shown} was interrupted: {exc.__class__.__name__}") from exc
        return b"".join(chunks)

    def _raise_late(self, url: str):
        raise ImageUnavailable(f"downloading {display_url(url)} took longer than "
                               f"IMAGE_TIMEOUT={self.settings.image_timeout} s")

    def _raise_if_late(self, shown: str, deadline: float) -> None:
        """A read that failed at the deadline was cut by it: say so, not "connection reset"."""
        if time.monotonic() >= deadline:
            raise ImageUnavailable(f"downloading {shown} took longer than IMAGE_TIMEOUT={self.settings.image_timeout} s")

    def _get(self, url: str, auth: LabelStudioAuth | None, force_refresh: bool, deadline: float) -> requests.Response:
        headers = auth.header(force_refresh) if auth is not None else {}
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            return self._session.get(url, headers=headers, stream=True, timeout=remaining, allow_redirects=False)
        except requests.RequestException as exc:
            self._raise_if_late(display_url(url), deadline)
            if isinstance(exc, requests.Timeout):
                raise ImageUnavailable(f"downloading {display_url(url)} took longer than "
                                       f"IMAGE_TIMEOUT={self.settings.image_timeout} s") from exc
            raise ImageUnavailable(f"cannot download {display_url(url)}: {exc.__class__.__name__}") from exc


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    original_size: tuple[int, int]  # (height, width) as Label Studio shows it
    input_image: np.ndarray  # RGB uint8, long side IMAGE_SIZE

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_image.shape[:2]


_FORMATS = "PNG, JPEG, WebP, TIFF, BMP or GIF"


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _as_browser_shows(image: Image.Image) -> Image.Image:
    """The pixels as a browser shows them on Label Studio's page. 16-bit and 32-bit grey as 8-bit
    (the high byte): PIL's convert("RGB") clips them, and a 16-bit PNG came out all white.
    Transparent pixels over white: convert("RGB") drops alpha and shows the colour hidden under
    it (often black), which is not what the annotator sees around a cut-out object."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.uint32)
        shift = 8 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 0
        return Image.fromarray((values >> shift).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        top = float(values.max(initial=1.0)) or 1.0
        return Image.fromarray((values.clip(0, None) / (top if top > 1.0 else 1.0) * 255).astype(np.uint8), "L")
    return image


def decode_image(data: bytes, max_pixels: int, long_side: int = IMAGE_SIZE) -> DecodedImage:
    """Decode, apply EXIF orientation (browsers do, so Label Studio's percentages assume it), resize so
    the long side is the encoder's input side (`long_side`)."""
    # no raster format starts with "<"; an SVG may open with a BOM, <?xml, a DOCTYPE or a comment
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        raise UnsupportedInput("SVG images are not supported: export the image as PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; MAX_IMAGE_PIXELS is {max_pixels}")
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        target_h, target_w = preprocess_shape(height, width, long_side)
        # JPEG can decode at 1/2, 1/4, 1/8 scale directly: a 20 MP photo then costs a fraction
        draft_size = (target_h, target_w) if orientation in (5, 6, 7, 8) else (target_w, target_h)
        image.draft("RGB", draft_size)
        image = _as_browser_shows(ImageOps.exif_transpose(image)).convert("RGB")
        if image.size != (target_w, target_h):
            image = image.resize((target_w, target_h), Image.BILINEAR)
        return DecodedImage((height, width), np.asarray(image))
    except UnidentifiedImageError:
        raise UnsupportedInput(f"cannot decode the image: not a {_FORMATS} file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnsupportedInput(f"cannot decode the image ({_FORMATS}): {exc}") from exc


def decode_full_image(data: bytes, max_pixels: int) -> np.ndarray:
    """RGB uint8 at full resolution, as a browser shows it (EXIF orientation, alpha over white):
    zoom windows are cut from it. Same checks and errors as decode_image."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        raise UnsupportedInput("SVG images are not supported: export the image as PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; MAX_IMAGE_PIXELS is {max_pixels}")
        return np.asarray(_as_browser_shows(ImageOps.exif_transpose(image)).convert("RGB"))
    except UnidentifiedImageError:
        raise UnsupportedInput(f"cannot decode the image: not a {_FORMATS} file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnsupportedInput(f"cannot decode the image ({_FORMATS}): {exc}") from exc
