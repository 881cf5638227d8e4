"""Official SAM checkpoints: where they come from, where they go, how they are verified."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import requests
from tqdm import tqdm

from model.files import atomic_path, write_atomic

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """The checkpoint is missing, cannot be downloaded, or fails verification."""


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    model_type: str
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL = {
    "vit_b": OfficialCheckpoint(
        "vit_b", _BASE + "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    ),
    "vit_l": OfficialCheckpoint(
        "vit_l", _BASE + "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"
    ),
    "vit_h": OfficialCheckpoint(
        "vit_h", _BASE + "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"
    ),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a checkpoint, memoised by (path, size, mtime): vit_h is 2.4 GB and workers restart often."""
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = memo_dir / "checkpoint-digests.json"
    try:
        memo = json.loads(memo_file.read_text())
    except FileNotFoundError:
        memo = {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable digest memo %s: %s", memo_file, exc)
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = sha256_file(path)
    memo[memo_key] = digest
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_file, json.dumps(memo, indent=1).encode())
    except OSError as exc:
        log.warning("could not memoise checkpoint digest in %s: %s", memo_file, exc)
    return digest


def resolve_checkpoint(model_type: str, explicit_path: str | None, model_dir: Path, download: bool = True) -> Path:
    """The checkpoint file to load: SAM_CHECKPOINT if given, else the official one (downloaded once)."""
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"SAM_CHECKPOINT={explicit_path} does not exist. Put the checkpoint file there, "
                f"or unset SAM_CHECKPOINT to download the official {model_type} checkpoint into {model_dir / 'checkpoints'}."
            )
        return path
    official = OFFICIAL[model_type]
    path = model_dir / "checkpoints" / official.filename
    if path.is_file():
        return path
    if not download:
        raise CheckpointError(f"no checkpoint at {path}; run `sam-backend download` or set SAM_CHECKPOINT")
    download_official(official, path)
    return path


def download_official(official: OfficialCheckpoint, path: Path, timeout: float = 30.0) -> None:
    """Stream the file with a progress bar, verify sha256, then move it into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hint = (
        f"Download {official.url} by hand (sha256 {official.sha256}) and put it at {path}, "
        f"or set SAM_CHECKPOINT to the path of a SAM {official.model_type} checkpoint."
    )
    log.info("downloading %s to %s", official.url, path)
    digest = hashlib.sha256()
    with atomic_path(path, suffix=".pth") as tmp, open(tmp, "wb") as out:
        try:
            with requests.get(official.url, stream=True, timeout=timeout) as response:
                response.raise_for_status()
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=official.filename) as bar:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as exc:
            raise CheckpointError(f"could not download the SAM checkpoint ({exc}). {hint}") from exc
        out.flush()
        if digest.hexdigest() != official.sha256:
            raise CheckpointError(
                f"downloaded {official.filename} has sha256 {digest.hexdigest()}, expected {official.sha256}. {hint}"
            )
