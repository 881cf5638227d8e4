"""backend/settings.py: Settings.from_env parses every variable and names the bad one."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError


def test_defaults_from_empty_environment():
    s = Settings.from_env({})
    assert s.sam_model_type == "vit_b"
    assert s.port == 9090
    assert s.output_type == "both"
    assert s.sam_checkpoint is None
    assert s.device == "auto"
    assert s.redis_url is None
    assert s.label_studio_url is None
    assert s.label_studio_api_key is None
    assert s.basic_auth_user is None and s.basic_auth_pass is None
    assert not s.basic_auth_enabled
    assert s.host == "0.0.0.0"
    assert s.workers == 1 and s.threads == 4
    assert s.allowed_image_hosts == ()
    assert s.log_level == "INFO"
    assert s.model_dir == Settings().model_dir
    assert s.max_image_bytes == 200 * 1024 * 1024
    assert s.max_image_pixels == 120_000_000
    assert s.image_timeout == 30.0
    assert s.embedding_ttl == 7 * 24 * 3600
    assert s.polygon_tolerance == 1.0
    assert s.polygon_min_area == 100
    assert s.polygon_max_vertices == 1000
    assert s.polygon_max_parts == 5  # a click is one object: a few parts at most (issue 13)
    assert s.prelabel_on_predict is True
    assert s == Settings()


def test_blank_values_mean_default():
    s = Settings.from_env({"PORT": "  ", "SAM_MODEL_TYPE": "", "LABEL_STUDIO_URL": " ", "OUTPUT_TYPE": ""})
    assert s.port == 9090 and s.sam_model_type == "vit_b" and s.label_studio_url is None
    assert s.output_type == "both"


def test_every_variable_is_parsed(tmp_path):
    env = {
        "SAM_MODEL_TYPE": "VIT_H",
        "SAM_CHECKPOINT": "/models/sam_vit_h.pth",
        "DEVICE": "CUDA:1",
        "REDIS_URL": "redis://cache:6379/2",
        "LABEL_STUDIO_URL": "https://ls.example.com:8443/",
        "LABEL_STUDIO_API_KEY": " abc123 ",
        "BASIC_AUTH_USER": "ml",
        "BASIC_AUTH_PASS": "s3cret",
        "MODEL_DIR": str(tmp_path / "models"),
        "LOG_LEVEL": "debug",
        "HOST": "127.0.0.1",
        "PORT": "8000",
        "WORKERS": "3",
        "THREADS": "16",
        "TORCH_THREADS": "2",
        "ALLOWED_IMAGE_HOSTS": " Images.Example.COM, ,cdn.example.org ,S3.AMAZONAWS.com",
        "MAX_IMAGE_BYTES": "1048576",
        "MAX_IMAGE_PIXELS": "5000000",
        "IMAGE_TIMEOUT": "2.5",
        "EMBEDDING_TTL": "3600",
        "EMBEDDING_LRU_SIZE": "3",
        "URL_DIGEST_TTL": "60",
        "OUTPUT_TYPE": "Polygon",
        "POLYGON_TOLERANCE": "0.5",
        "POLYGON_MIN_AREA": "25",
        "POLYGON_MAX_VERTICES": "400",
        "POLYGON_MAX_PARTS": "20",
        "PRELABEL_ON_PREDICT": "no",
    }
    s = Settings.from_env(env)
    assert s.sam_model_type == "vit_h"
    assert s.sam_checkpoint == "/models/sam_vit_h.pth"
    assert s.device == "cuda:1"
    assert s.redis_url == "redis://cache:6379/2"
    assert s.label_studio_url == "https://ls.example.com:8443"
    assert s.label_studio_api_key == "abc123"
    assert (s.basic_auth_user, s.basic_auth_pass) == ("ml", "s3cret")
    assert s.basic_auth_enabled
    assert s.model_dir == tmp_path / "models" and isinstance(s.model_dir, Path)
    assert s.log_level == "DEBUG"
    assert s.host == "127.0.0.1"
    assert s.port == 8000 and isinstance(s.port, int)
    assert s.workers == 3
    assert s.threads == 16
    assert s.torch_threads == 2
    assert s.allowed_image_hosts == ("images.example.com", "cdn.example.org", "s3.amazonaws.com")
    assert s.max_image_bytes == 1048576
    assert s.max_image_pixels == 5_000_000
    assert s.image_timeout == 2.5 and isinstance(s.image_timeout, float)
    assert s.embedding_ttl == 3600
    assert s.embedding_lru_size == 3
    assert s.url_digest_ttl == 60
    assert s.output_type == "polygon"
    assert s.polygon_tolerance == 0.5
    assert s.polygon_min_area == 25
    assert (s.polygon_max_vertices, s.polygon_max_parts) == (400, 20)
    assert s.prelabel_on_predict is False


def test_label_studio_url_trailing_slashes_stripped():
    assert Settings.from_env({"LABEL_STUDIO_URL": "http://localhost:8080//"}).label_studio_url == "http://localhost:8080"


def test_model_dir_expands_user():
    s = Settings.from_env({"MODEL_DIR": "~/sam-models"})
    assert s.model_dir == Path.home() / "sam-models"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0"])
def test_valid_devices(device):
    assert Settings.from_env({"DEVICE": device}).device == device


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_valid_model_types(model_type):
    assert Settings.from_env({"SAM_MODEL_TYPE": model_type}).sam_model_type == model_type


@pytest.mark.parametrize("output_type", ["both", "brush", "polygon", "bitmask"])
def test_valid_output_types(output_type):
    assert Settings.from_env({"OUTPUT_TYPE": output_type}).output_type == output_type


@pytest.mark.parametrize(
    "env, name",
    [
        ({"SAM_MODEL_TYPE": "vit_x"}, "SAM_MODEL_TYPE"),
        ({"PORT": "abc"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "80.5"}, "PORT"),
        ({"WORKERS": "0"}, "WORKERS"),
        ({"THREADS": "-1"}, "THREADS"),
        ({"MAX_IMAGE_BYTES": "lots"}, "MAX_IMAGE_BYTES"),
        ({"MAX_IMAGE_PIXELS": "0"}, "MAX_IMAGE_PIXELS"),
        ({"IMAGE_TIMEOUT": "0"}, "IMAGE_TIMEOUT"),
        ({"IMAGE_TIMEOUT": "soon"}, "IMAGE_TIMEOUT"),
        ({"EMBEDDING_TTL": "-5"}, "EMBEDDING_TTL"),
        ({"POLYGON_TOLERANCE": "-0.1"}, "POLYGON_TOLERANCE"),
        ({"POLYGON_MIN_AREA": "1.5"}, "POLYGON_MIN_AREA"),
        ({"POLYGON_MAX_PARTS": "-1"}, "POLYGON_MAX_PARTS"),
        ({"POLYGON_MAX_VERTICES": "many"}, "POLYGON_MAX_VERTICES"),
        ({"OUTPUT_TYPE": "mask"}, "OUTPUT_TYPE"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"DEVICE": "mps"}, "DEVICE"),
        ({"LABEL_STUDIO_URL": "ftp://x"}, "LABEL_STUDIO_URL"),
        ({"LABEL_STUDIO_URL": "localhost:8080"}, "LABEL_STUDIO_URL"),
        ({"LABEL_STUDIO_URL": "http://"}, "LABEL_STUDIO_URL"),
        ({"BASIC_AUTH_USER": "ml"}, "BASIC_AUTH_USER"),
        ({"BASIC_AUTH_PASS": "s3cret"}, "BASIC_AUTH_PASS"),
        ({"PRELABEL_ON_PREDICT": "maybe"}, "PRELABEL_ON_PREDICT"),
        ({"ENCODE_BATCH_SIZE": "0"}, "ENCODE_BATCH_SIZE"),
        ({"ENCODE_PRECISION": "int8"}, "ENCODE_PRECISION"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_value_message_shows_the_value():
    with pytest.raises(SettingsError, match="'vit_x'"):
        Settings.from_env({"SAM_MODEL_TYPE": "vit_x"})
    with pytest.raises(SettingsError, match="'abc'"):
        Settings.from_env({"PORT": "abc"})


def test_replace_returns_a_changed_copy():
    s = Settings.from_env({"PORT": "8000"})
    t = s.replace(port=9000)
    assert (s.port, t.port) == (8000, 9000)


def test_from_env_reads_os_environ_when_no_mapping_given(monkeypatch):
    for name in ("SAM_MODEL_TYPE", "DEVICE", "LABEL_STUDIO_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PORT", "9191")
    monkeypatch.setenv("OUTPUT_TYPE", "brush")
    s = Settings.from_env()
    assert s.port == 9191 and s.output_type == "brush"


def test_encode_batch_size_and_precision():
    assert (Settings.from_env({}).encode_batch_size, Settings.from_env({}).encode_precision) == (1, "auto")
    got = Settings.from_env({"ENCODE_BATCH_SIZE": "8", "ENCODE_PRECISION": "BF16"})
    assert (got.encode_batch_size, got.encode_precision) == (8, "bf16")
