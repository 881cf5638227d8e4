"""Official checkpoints of every model family: where they come from, where they go, how they are verified.

SAM publishes no digests either, but its files have been hashed by many for years (the values below
are the ones everyone records). SAM 2.1 (dl.fbaipublicfiles.com) and EfficientViT-SAM (Hugging Face)
publish no sha256 anywhere we could find: for those, the first download's digest is recorded beside
the file (`<file>.sha256`) and every later start checks the file against it (trust on first use),
and the log says so. Pin a digest here once one is published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from urllib.parse import urljoin, urlsplit

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
    sha256: str | None  # None: not published; recorded on first download (see the module's docstring)
    family: str = "SAM"

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
# EfficientViT-SAM (MIT HAN Lab, Apache-2.0): the links of the efficientvit README's model table
_EVIT = "https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/"
for _size in ("l0", "l1", "l2", "xl0", "xl1"):
    OFFICIAL[_size] = OfficialCheckpoint(_size, f"{_EVIT}efficientvit_sam_{_size}.pt", None, "EfficientViT-SAM")
# SAM 2.1 (Meta, Apache-2.0): the links of sam2's checkpoints/download_ckpts.sh (release 092824)
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
for _size, _name in (("hiera_t", "tiny"), ("hiera_s", "small"), ("hiera_b+", "base_plus"), ("hiera_l", "large")):
    OFFICIAL[_size] = OfficialCheckpoint(_size, f"{_SAM2}sam2.1_hiera_{_name}.pt", None, "SAM 2.1")
# Hugging Face answers a download with a redirect to its CDN (cdn-lfs.hf.co, cas-bridge.xethub.hf.co):
# hops to those domains are followed, hops anywhere else are refused
_CDN_DOMAINS = {"huggingface.co": (".hf.co", ".huggingface.co")}


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
        check_recorded(official, path, model_dir)
        return path
    if not download:
        raise CheckpointError(f"no checkpoint at {path}; run `sam-backend download` or set SAM_CHECKPOINT")
    download_official(official, path)
    return path


def recorded_digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def check_recorded(official: OfficialCheckpoint, path: Path, memo_dir: Path) -> None:
    """An official file without a published digest is checked against the digest its first download
    recorded: a file changed or truncated since is refused rather than loaded."""
    if official.sha256 is not None:
        return  # verified when downloaded; the file is then only ever replaced atomically
    record = recorded_digest_path(path)
    try:
        expected = record.read_text().strip()
    except FileNotFoundError:
        return  # put there by hand: the user vouches for it (as for SAM_CHECKPOINT)
    found = checkpoint_digest(path, memo_dir)  # memoised: the loader asks for the same digest next
    if found != expected:
        raise CheckpointError(f"{path} has sha256 {found}, but its download recorded {expected} in {record}: "
                              f"the file changed since. Delete both files to download it again.")


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _get(url: str, timeout: float, hops: int = 5):
    """GET the official URL, following redirects only to its own host or its CDN (requests would follow any)."""
    start = _host(url)
    for _ in range(hops + 1):
        host = _host(url)
        if host != start and not host.endswith(_CDN_DOMAINS.get(start, ())):
            raise CheckpointError(f"{start} redirected the checkpoint download to {host or url!r}; refusing it")
        response = requests.get(url, stream=True, timeout=timeout, allow_redirects=False)
        if response.is_redirect:
            url = urljoin(url, response.headers["Location"])
            response.close()
            continue
        return response
    raise CheckpointError(f"too many redirects downloading {url}")


def download_official(official: OfficialCheckpoint, path: Path, timeout: float = 30.0) -> None:
    """Stream the file with a progress bar, verify sha256, then move it into place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    published = f"sha256 {official.sha256}" if official.sha256 else "no sha256 is published for it"
    hint = (
        f"Download {official.url} by hand ({published}) and put it at {path}, "
        f"or set SAM_CHECKPOINT to the path of a {official.family} {official.model_type} checkpoint."
    )
    log.info("downloading %s to %s", official.url, path)
    digest = hashlib.sha256()
    with atomic_path(path, suffix=".pth") as tmp, open(tmp, "wb") as out:
        try:
            with _get(official.url, timeout) as response:
                response.raise_for_status()
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=official.filename) as bar:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except requests.RequestException as exc:
            raise CheckpointError(f"could not download the {official.family} checkpoint ({exc}). {hint}") from exc
        out.flush()
        if official.sha256 is None:
            # nothing published to check against: record what came, so later starts detect a changed file
            write_atomic(recorded_digest_path(path), (digest.hexdigest() + "\n").encode())
            log.warning("%s publishes no sha256; recorded this download's (%s) in %s and will check the file "
                        "against it from now on", official.url, digest.hexdigest(), recorded_digest_path(path))
        elif digest.hexdigest() != official.sha256:
            raise CheckpointError(
                f"downloaded {official.filename} has sha256 {digest.hexdigest()}, expected {official.sha256}. {hint}"
            )
