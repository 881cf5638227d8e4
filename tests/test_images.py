"""backend/pipeline/images.py: downloads from a real HTTP server (token, allowlist, limits) and decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.errors import HostNotAllowed, ImageTooLarge, ImageUnavailable, NotConfigured, UnsupportedInput
from backend.pipeline.images import ImageFetcher, decode_image
from backend.settings import Settings
from tests.conftest import TOKEN, make_image

PNG = make_image(80, 60, seed=1)


def fetcher_for(image_server, **changes) -> ImageFetcher:
    settings = Settings(label_studio_url=image_server.url, label_studio_api_key=TOKEN, image_timeout=5.0)
    return ImageFetcher(settings.replace(**changes))


def localhost_url(image_server, path: str) -> str:
    """The same server under another host name: a different host as far as the allowlist is concerned."""
    return f"http://localhost:{image_server.port}{path}"


# ---------------------------------------------------------------- fetching


def test_relative_data_url_is_fetched_with_the_token(image_server):
    image_server.add("/data/upload/1/a.png", PNG)
    data = fetcher_for(image_server).fetch("/data/upload/1/a.png")
    assert data == PNG
    assert image_server.requests == [("/data/upload/1/a.png", f"Token {TOKEN}")]


def test_local_files_url_with_query_string(image_server):
    image_server.add("/data/local-files/?d=local/img.png", PNG)
    assert fetcher_for(image_server).fetch("/data/local-files/?d=local/img.png") == PNG
    assert image_server.requests == [("/data/local-files/?d=local/img.png", f"Token {TOKEN}")]


def test_absolute_url_on_label_studio_host_gets_the_token(image_server):
    image_server.add("/data/upload/2/b.png", PNG)
    data = fetcher_for(image_server).fetch(image_server.url + "/data/upload/2/b.png")
    assert data == PNG
    assert image_server.requests == [("/data/upload/2/b.png", f"Token {TOKEN}")]


def test_other_host_not_in_allowlist_is_refused(image_server):
    image_server.add("/x.png", PNG)
    with pytest.raises(HostNotAllowed, match="localhost") as info:
        fetcher_for(image_server).fetch(localhost_url(image_server, "/x.png"))
    assert "ALLOWED_IMAGE_HOSTS" in info.value.message
    assert image_server.requests == []  # refused before any request is made


def test_allowed_host_is_fetched_without_credentials(image_server):
    image_server.add("/x.png", PNG)
    fetcher = fetcher_for(image_server, allowed_image_hosts=("localhost",))
    assert fetcher.fetch(localhost_url(image_server, "/x.png")) == PNG
    assert image_server.requests == [("/x.png", None)]


def test_token_never_leaks_to_an_allowed_third_party_host(image_server):
    """Even a /data/ path on another host gets no Authorization header, so that server answers 401."""
    image_server.add("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(image_server, allowed_image_hosts=("localhost",))
    with pytest.raises(ImageUnavailable):
        fetcher.fetch(localhost_url(image_server, "/data/upload/1/a.png"))
    assert image_server.requests == [("/data/upload/1/a.png", None)]


def test_wildcard_allows_any_host_still_without_credentials(image_server):
    image_server.add("/x.png", PNG)
    fetcher = fetcher_for(image_server, allowed_image_hosts=("*",))
    assert fetcher.fetch(localhost_url(image_server, "/x.png")) == PNG
    assert image_server.requests == [("/x.png", None)]


def test_same_host_on_another_port_is_another_origin(image_server):
    """127.0.0.1 on a different port is not Label Studio: not allowed, and never given the token."""
    fetcher = fetcher_for(image_server)
    other = f"http://127.0.0.1:{image_server.port + 1 if image_server.port < 65535 else 1}/data/x.png"
    with pytest.raises(HostNotAllowed):
        fetcher.fetch(other)
    url, auth = fetcher_for(image_server, allowed_image_hosts=("127.0.0.1",)).resolve(other)
    assert url == other and auth is None


def test_wrong_token_is_reported_as_an_api_key_problem(image_server):
    image_server.add("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(image_server, label_studio_api_key="wrongtoken")
    with pytest.raises(ImageUnavailable, match="LABEL_STUDIO_API_KEY") as info:
        fetcher.fetch("/data/upload/1/a.png")
    assert "401" in info.value.message
    assert image_server.requests == [("/data/upload/1/a.png", "Token wrongtoken")]


def test_missing_file_is_unavailable(image_server):
    with pytest.raises(ImageUnavailable, match="404") as info:
        fetcher_for(image_server).fetch("/data/upload/1/missing.png")
    assert "/data/upload/1/missing.png" in info.value.message


def test_file_larger_than_max_image_bytes(image_server):
    image_server.add("/data/big.png", PNG)
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_BYTES"):
        fetcher_for(image_server, max_image_bytes=len(PNG) - 1).fetch("/data/big.png")
    # exactly at the limit is fine
    assert fetcher_for(image_server, max_image_bytes=len(PNG)).fetch("/data/big.png") == PNG


def test_relative_url_without_label_studio_is_a_missing_setting():
    fetcher = ImageFetcher(Settings(image_timeout=5.0))
    assert not fetcher.has_label_studio()
    with pytest.raises(NotConfigured, match="LABEL_STUDIO_URL"):
        fetcher.fetch("/data/upload/1/a.png")


def test_setup_supplies_label_studio_when_none_is_configured(image_server):
    image_server.add("/data/upload/1/a.png", PNG)
    fetcher = ImageFetcher(Settings(image_timeout=5.0))
    fetcher.remember_setup(image_server.url + "/", TOKEN)
    assert fetcher.has_label_studio()
    assert fetcher.fetch("/data/upload/1/a.png") == PNG
    assert image_server.requests == [("/data/upload/1/a.png", f"Token {TOKEN}")]


def test_setup_with_a_non_http_hostname_is_ignored():
    fetcher = ImageFetcher(Settings(image_timeout=5.0))
    fetcher.remember_setup("localhost:8080", TOKEN)
    assert not fetcher.has_label_studio()
    with pytest.raises(NotConfigured):
        fetcher.fetch("/data/upload/1/a.png")


def test_setup_token_used_for_configured_url_without_api_key(image_server):
    image_server.add("/data/upload/1/a.png", PNG)
    fetcher = fetcher_for(image_server, label_studio_api_key=None)
    fetcher.remember_setup(image_server.url, TOKEN)
    assert fetcher.fetch("/data/upload/1/a.png") == PNG
    assert image_server.requests == [("/data/upload/1/a.png", f"Token {TOKEN}")]


@pytest.mark.parametrize("url", ["s3://bucket/x", "gs://bucket/x.png", "file:///etc/passwd"])
def test_non_http_schemes_are_unsupported(url):
    fetcher = ImageFetcher(Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key=TOKEN))
    with pytest.raises(UnsupportedInput, match="not supported"):
        fetcher.fetch(url)


def test_unreachable_allowed_host_is_unavailable(image_server):
    from tests.conftest import free_port

    fetcher = fetcher_for(image_server, allowed_image_hosts=("127.0.0.1",))
    with pytest.raises(ImageUnavailable, match="cannot download"):
        fetcher.fetch(f"http://127.0.0.1:{free_port()}/x.png")


# ---------------------------------------------------------------- decoding


def rgb(pixel) -> tuple[int, int, int]:
    return tuple(int(c) for c in pixel)


def test_decode_png():
    decoded = decode_image(make_image(800, 600), max_pixels=10_000_000)
    assert decoded.original_size == (600, 800)
    assert decoded.input_image.shape == (768, 1024, 3)
    assert decoded.input_image.dtype == np.uint8
    assert decoded.input_size == (768, 1024)


def test_decode_keeps_content_in_place():
    decoded = decode_image(make_image(800, 600), max_pixels=10_000_000).input_image
    # make_image paints a red disc at (0.4 w, 0.45 h) and a blue square at 0.7-0.9 of both sides
    assert rgb(decoded[int(768 * 0.45), int(1024 * 0.4)]) == pytest.approx((230, 60, 40), abs=8)
    assert rgb(decoded[int(768 * 0.8), int(1024 * 0.8)]) == pytest.approx((20, 20, 160), abs=8)


def test_decode_portrait_and_small_images_scale_up_to_1024():
    decoded = decode_image(make_image(60, 80), max_pixels=10_000_000)
    assert decoded.original_size == (80, 60)
    assert decoded.input_image.shape == (1024, 768, 3)


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(make_image(width, height, fmt="JPEG")))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_decode_jpeg_applies_exif_rotation():
    data = jpeg_with_orientation(800, 600, 6)  # pixels 800 wide; shown rotated 90 degrees clockwise
    assert Image.open(io.BytesIO(data)).size == (800, 600)
    decoded = decode_image(data, max_pixels=10_000_000)
    assert decoded.original_size == (800, 600)  # (height, width) as a browser shows it
    assert decoded.input_image.shape == (1024, 768, 3)
    # the blue square, bottom-right in the stored pixels, is bottom-left once rotated clockwise
    img = decoded.input_image
    assert rgb(img[int(1024 * 0.8), int(768 * 0.2)]) == pytest.approx((20, 20, 160), abs=12)
    assert rgb(img[int(1024 * 0.8), int(768 * 0.8)]) != pytest.approx((20, 20, 160), abs=12)


def test_decode_large_jpeg_uses_draft_but_keeps_the_target_size():
    decoded = decode_image(make_image(2400, 1800, fmt="JPEG"), max_pixels=10_000_000)
    assert decoded.original_size == (1800, 2400)
    assert decoded.input_image.shape == (768, 1024, 3)
    assert rgb(decoded.input_image[int(768 * 0.8), int(1024 * 0.8)]) == pytest.approx((20, 20, 160), abs=12)


def test_decode_garbage_is_unsupported():
    with pytest.raises(UnsupportedInput, match="cannot decode"):
        decode_image(b"this is not an image at all" * 10, max_pixels=10_000_000)


def test_decode_truncated_png_is_unsupported():
    data = make_image(200, 150)
    with pytest.raises(UnsupportedInput):
        decode_image(data[: len(data) // 2], max_pixels=10_000_000)


def test_decode_too_many_pixels():
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS") as info:
        decode_image(make_image(80, 60), max_pixels=1000)
    assert "80x60" in info.value.message
    # the limit is inclusive
    assert decode_image(make_image(80, 60), max_pixels=80 * 60).original_size == (60, 80)


def test_personal_access_token_is_exchanged_for_a_bearer_access_token(image_server):
    """A personal access token sent as is gets 401 from Label Studio: it must be refreshed first."""
    image_server.add("/data/upload/pat.png", b"png-bytes")
    settings = Settings(label_studio_url=image_server.url, label_studio_api_key=image_server.pat)
    fetcher = ImageFetcher(settings)
    assert fetcher.fetch("/data/upload/pat.png") == b"png-bytes"
    assert fetcher.fetch("/data/upload/pat.png") == b"png-bytes"
    assert len(image_server.access_tokens) == 1  # refreshed once, reused while valid
    sent = [auth for path, auth in image_server.requests if path == "/data/upload/pat.png"]
    assert sent == [f"Bearer {image_server.access_tokens[0]}"] * 2
    assert all(image_server.pat not in (auth or "") for _, auth in image_server.requests)


def test_revoked_access_token_is_refreshed_once_and_retried(image_server):
    image_server.add("/data/upload/pat.png", b"png-bytes")
    fetcher = ImageFetcher(Settings(label_studio_url=image_server.url, label_studio_api_key=image_server.pat))
    assert fetcher.fetch("/data/upload/pat.png") == b"png-bytes"
    image_server.access_tokens.clear()  # Label Studio forgot it (restart, rotation)
    assert fetcher.fetch("/data/upload/pat.png") == b"png-bytes"
    assert len(image_server.access_tokens) == 1


def test_refused_personal_access_token_says_so(image_server):
    image_server.add("/data/upload/pat.png", b"png-bytes")
    other = image_server.pat[:-4] + "AAAA"
    fetcher = ImageFetcher(Settings(label_studio_url=image_server.url, label_studio_api_key=other))
    with pytest.raises(ImageUnavailable, match="personal access token"):
        fetcher.fetch("/data/upload/pat.png")


def test_presigned_credentials_never_appear_in_messages(image_server):
    from backend.pipeline.images import display_url

    url = "https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIA123&X-Amz-Signature=deadbeef&X-Amz-Expires=60"
    shown = display_url(url)
    assert "AKIA123" not in shown and "deadbeef" not in shown and "X-Amz-Expires=60" in shown
    assert display_url("/data/local-files/?d=local/a.png") == "/data/local-files/?d=local/a.png"
    fetcher = ImageFetcher(Settings(label_studio_url=image_server.url, label_studio_api_key=TOKEN))
    with pytest.raises(ImageUnavailable) as caught:
        fetcher.fetch("/data/upload/missing.png?token=supersecret")
    assert "supersecret" not in caught.value.message
