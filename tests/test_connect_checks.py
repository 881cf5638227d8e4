"""connect's and doctor's checks that need no server: which task image hosts the backend will refuse."""

from __future__ import annotations

from pathlib import Path

from backend.commands.connect import config_problems, refused_image_hosts
from backend.labelstudio.label_config import parse_label_config
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

CONFIG = (ROOT / "label_config" / "single_object_polygon.xml").read_text()


def test_every_refused_host_is_named_with_its_port_and_counted():
    settings = Settings(label_studio_url="http://ls.example:8080", label_studio_api_key="t",
                        allowed_image_hosts=("cdn.example",))
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate([
        "/data/upload/1/a.png",  # Label Studio's own origin
        "http://ls.example:8080/data/local-files/?d=b.png",
        "https://cdn.example/c.png",  # allowed host, any port
        "http://ls.example:9000/d.png", "http://ls.example:9000/e.png",  # Label Studio's host, another port
        "https://photos.example/f.png",
    ])] + [{"id": 99, "data": {}}]
    refused = refused_image_hosts(settings, tasks, parse_label_config(CONFIG))
    assert list(refused)[:2] == ["ls.example:9000", "photos.example:443"]
    assert refused["ls.example:9000"][0] == 2 and refused["photos.example:443"][0] == 1
    assert "ALLOWED_IMAGE_HOSTS" in refused["ls.example:9000"][1]
    assert [count for count, reason in refused.values() if "no image URL" in reason] == [1]
    assert len(refused) == 3


def test_config_problems_name_the_fix():
    assert config_problems(CONFIG) == []
    assert any('smart="true"' in p for p in config_problems(CONFIG.replace(' smart="true"', "")))
    assert any("<Image>" in p for p in config_problems("<View><Text name='t' value='$t'/></View>"))
