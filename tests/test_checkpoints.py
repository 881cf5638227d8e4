"""model/checkpoints.py and model/sam.py: finding, downloading, verifying and loading SAM checkpoints."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from model.checkpoints import (
    OFFICIAL,
    CheckpointError,
    OfficialCheckpoint,
    checkpoint_digest,
    download_official,
    resolve_checkpoint,
    sha256_file,
)
from model.sam import KNOWN_ARCHITECTURES, Architecture, SamModel, infer_architecture, model_id
from tests.conftest import free_port


class NotWeights:
    """An arbitrary Python object: unpickling it would run code of the pickler's choosing."""

    def __init__(self):
        self.payload = "anything"


# ---------------------------------------------------------------- resolve_checkpoint


def test_explicit_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "sam.pth"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("vit_b", str(missing), tmp_path / "models")
    assert str(missing) in str(info.value)
    assert "SAM_CHECKPOINT" in str(info.value)


def test_explicit_existing_path_is_used(tiny_checkpoint, tmp_path):
    assert resolve_checkpoint("vit_h", str(tiny_checkpoint), tmp_path / "models", download=False) == tiny_checkpoint


def test_explicit_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        resolve_checkpoint("vit_b", str(tmp_path), tmp_path / "models")


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_no_checkpoint_and_no_download_names_the_expected_file(tmp_path, model_type):
    model_dir = tmp_path / "models"
    expected = model_dir / "checkpoints" / OFFICIAL[model_type].filename
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(model_type, None, model_dir, download=False)
    assert str(expected) in str(info.value)
    assert not expected.exists()


def test_official_file_already_in_place_is_used_without_download(tmp_path):
    model_dir = tmp_path / "models"
    path = model_dir / "checkpoints" / "sam_vit_l_0b3195.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placeholder")
    assert resolve_checkpoint("vit_l", None, model_dir, download=False) == path
    assert resolve_checkpoint("vit_l", "", model_dir, download=True) == path  # empty SAM_CHECKPOINT = unset


def test_official_filenames():
    assert OFFICIAL["vit_b"].filename == "sam_vit_b_01ec64.pth"
    assert OFFICIAL["vit_l"].filename == "sam_vit_l_0b3195.pth"
    assert OFFICIAL["vit_h"].filename == "sam_vit_h_4b8939.pth"


# ---------------------------------------------------------------- download_official

CKPT_BYTES = os.urandom(3 * (1 << 20) + 123)  # several download chunks


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_with_correct_sha256_writes_the_file(image_server, tmp_path):
    image_server.add("/ckpt.pth", CKPT_BYTES)
    official = OfficialCheckpoint("vit_b", image_server.url + "/ckpt.pth", hashlib.sha256(CKPT_BYTES).hexdigest())
    target = tmp_path / "models" / "checkpoints" / official.filename
    download_official(official, target)
    assert target.read_bytes() == CKPT_BYTES
    assert leftovers(target.parent) == ["ckpt.pth"]  # no temporary file left beside it
    assert image_server.requests == [("/ckpt.pth", None)]


def test_download_with_wrong_sha256_leaves_nothing(image_server, tmp_path):
    image_server.add("/ckpt.pth", CKPT_BYTES)
    wrong = "0" * 64
    official = OfficialCheckpoint("vit_b", image_server.url + "/ckpt.pth", wrong)
    target = tmp_path / "checkpoints" / "ckpt.pth"
    with pytest.raises(CheckpointError, match="sha256") as info:
        download_official(official, target)
    message = str(info.value)
    assert hashlib.sha256(CKPT_BYTES).hexdigest() in message and wrong in message
    assert not target.exists()
    assert leftovers(target.parent) == []


def test_download_from_unreachable_url_says_where_to_put_the_file(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.pth"
    official = OfficialCheckpoint("vit_l", url, "ab" * 32)
    target = tmp_path / "checkpoints" / "x.pth"
    with pytest.raises(CheckpointError) as info:
        download_official(official, target, timeout=5.0)
    message = str(info.value)
    assert str(target) in message
    assert url in message
    assert "SAM_CHECKPOINT" in message
    assert leftovers(target.parent) == []


def test_download_http_error_is_a_checkpoint_error(image_server, tmp_path):
    official = OfficialCheckpoint("vit_b", image_server.url + "/missing.pth", "ab" * 32)
    target = tmp_path / "checkpoints" / "missing.pth"
    with pytest.raises(CheckpointError, match="404"):
        download_official(official, target, timeout=5.0)
    assert leftovers(target.parent) == []


def test_resolve_checkpoint_downloads_the_official_file(image_server, tmp_path, monkeypatch):
    image_server.add("/sam_vit_b_01ec64.pth", CKPT_BYTES)
    local = OfficialCheckpoint("vit_b", image_server.url + "/sam_vit_b_01ec64.pth", hashlib.sha256(CKPT_BYTES).hexdigest())
    monkeypatch.setitem(OFFICIAL, "vit_b", local)  # point the official entry at the local server
    model_dir = tmp_path / "models"
    path = resolve_checkpoint("vit_b", None, model_dir, download=True)
    assert path == model_dir / "checkpoints" / "sam_vit_b_01ec64.pth"
    assert path.read_bytes() == CKPT_BYTES
    # second call finds it in place: no second request
    assert resolve_checkpoint("vit_b", None, model_dir, download=True) == path
    assert len(image_server.requests) == 1


# ---------------------------------------------------------------- infer_architecture


def test_infer_architecture_of_the_tiny_checkpoint(tiny_checkpoint):
    arch = infer_architecture(torch.load(tiny_checkpoint, weights_only=True))
    assert arch == Architecture(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))
    assert arch.name == "custom32x2"


def test_infer_architecture_of_vit_b():
    from segment_anything import build_sam_vit_b

    state_dict = build_sam_vit_b(checkpoint=None).state_dict()
    arch = infer_architecture(state_dict)
    assert arch == KNOWN_ARCHITECTURES["vit_b"]
    assert arch == Architecture(768, 12, 12, (2, 5, 8, 11))
    assert arch.name == "vit_b"


def test_infer_architecture_rejects_foreign_state_dicts(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        infer_architecture({"fc.weight": torch.zeros(2, 2)})
    state_dict = torch.load(tiny_checkpoint, weights_only=True)
    gap = {k: v for k, v in state_dict.items() if not k.startswith("image_encoder.blocks.0.")}
    with pytest.raises(CheckpointError, match="missing or out of order"):
        infer_architecture(gap)


# ---------------------------------------------------------------- SamModel.load


def test_load_tiny_checkpoint(tiny_checkpoint):
    digest = sha256_file(tiny_checkpoint)
    model = SamModel.load(tiny_checkpoint, digest, device="cpu")
    assert model.arch == Architecture(32, 2, 2, (1,))
    assert model.device == torch.device("cpu")
    assert model.checkpoint_digest == digest
    assert model.model_id == model_id("custom32x2", digest) == f"custom32x2-{digest[:12]}"
    assert model.onnx is None
    assert not model.sam.training
    saved = torch.load(tiny_checkpoint, weights_only=True)
    loaded = model.sam.state_dict()
    assert saved.keys() == loaded.keys()
    for key in ("image_encoder.patch_embed.proj.weight", "mask_decoder.iou_prediction_head.layers.0.weight"):
        assert torch.equal(saved[key], loaded[key])


def test_loaded_tiny_model_encodes_and_decodes(tiny_checkpoint):
    from model.prompts import Prompt, to_model

    model = SamModel.load(tiny_checkpoint, sha256_file(tiny_checkpoint), device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    features = model.encode(image)
    assert features.shape == (256, 64, 64) and features.dtype == np.float32
    logits, score = model.decode(features, to_model(Prompt(((0.5, 0.5),), (1,)), (768, 1024)))
    assert logits.shape == (256, 256) and np.isfinite(logits).all()
    assert isinstance(score, float)


def test_load_random_bytes_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="garbage.pth"):
        SamModel.load(path, "0" * 64, device="cpu")


def test_load_refuses_pickled_python_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotWeights()}, path)
    # the file is a valid torch pickle: only weights_only=True stops it
    assert isinstance(torch.load(path, weights_only=False)["x"], NotWeights)
    with pytest.raises(CheckpointError, match="evil.pth"):
        SamModel.load(path, "0" * 64, device="cpu")


def test_load_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="state dict"):
        SamModel.load(path, "0" * 64, device="cpu")


def test_load_state_dict_with_wrong_shapes(tiny_checkpoint, tmp_path):
    state_dict = torch.load(tiny_checkpoint, weights_only=True)
    state_dict["mask_decoder.iou_token.weight"] = torch.zeros(2, 2)
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match="does not match"):
        SamModel.load(path, "0" * 64, device="cpu")


# ---------------------------------------------------------------- checkpoint_digest


def test_checkpoint_digest_is_sha256_and_memoised(tiny_checkpoint, tmp_path):
    memo_dir = tmp_path / "models"
    expected = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert checkpoint_digest(tiny_checkpoint, memo_dir) == expected
    assert sha256_file(tiny_checkpoint) == expected

    memo_file = memo_dir / "checkpoint-digests.json"
    memo = json.loads(memo_file.read_text())
    assert list(memo.values()) == [expected]
    (key,) = memo
    stat = tiny_checkpoint.stat()
    assert key == f"{tiny_checkpoint.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"

    # the memo is what a second call reads: a planted value comes back without rehashing
    memo_file.write_text(json.dumps({key: "memoised"}))
    assert checkpoint_digest(tiny_checkpoint, memo_dir) == "memoised"


def test_checkpoint_digest_recomputes_when_the_file_changes(tmp_path):
    memo_dir = tmp_path / "models"
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"first version")
    first = checkpoint_digest(path, memo_dir)
    assert first == hashlib.sha256(b"first version").hexdigest()
    path.write_bytes(b"second, longer version")
    second = checkpoint_digest(path, memo_dir)
    assert second == hashlib.sha256(b"second, longer version").hexdigest()
    memo = json.loads((memo_dir / "checkpoint-digests.json").read_text())
    assert sorted(memo.values()) == sorted([first, second])


def test_checkpoint_digest_ignores_a_corrupt_memo(tmp_path):
    memo_dir = tmp_path / "models"
    memo_dir.mkdir()
    (memo_dir / "checkpoint-digests.json").write_text("{not json")
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"weights")
    assert checkpoint_digest(path, memo_dir) == hashlib.sha256(b"weights").hexdigest()
    assert json.loads((memo_dir / "checkpoint-digests.json").read_text())  # rewritten as valid JSON


def test_a_decoder_that_cannot_be_exported_to_onnx_falls_back_to_torch(tiny_checkpoint, tmp_path, monkeypatch):
    # a fake for a fault we cannot cause here: an older torch whose exporter lacks `dynamo=`
    # raises TypeError; every click used to answer 500
    from model import onnx_decoder
    from model.prompts import Prompt, to_model

    def old_torch_export(*args, **kwargs):
        raise TypeError("export() got an unexpected keyword argument 'dynamo'")

    monkeypatch.setattr(onnx_decoder, "export", old_torch_export)
    model = SamModel.load(tiny_checkpoint, sha256_file(tiny_checkpoint), device="cpu", onnx_dir=tmp_path / "onnx")
    assert model.onnx is None  # decodes in torch
    features = model.encode(np.zeros((768, 1024, 3), np.uint8))
    logits, _ = model.decode(features, to_model(Prompt(((0.5, 0.5),), (1,)), (768, 1024)))
    assert logits.shape == (256, 256) and np.isfinite(logits).all()


# ---------------------------------------------------------------- files without a published sha256


def test_a_download_without_published_sha256_is_recorded_and_checked_on_every_start(image_server, tmp_path,
                                                                                     monkeypatch):
    image_server.add("/sam2.1_hiera_tiny.pt", CKPT_BYTES)
    local = OfficialCheckpoint("hiera_t", image_server.url + "/sam2.1_hiera_tiny.pt", None, "SAM 2.1")
    monkeypatch.setitem(OFFICIAL, "hiera_t", local)
    model_dir = tmp_path / "models"
    path = resolve_checkpoint("hiera_t", None, model_dir)
    record = path.with_name(path.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(CKPT_BYTES).hexdigest()
    assert resolve_checkpoint("hiera_t", None, model_dir) == path  # unchanged: accepted, no second download
    assert len(image_server.requests) == 1
    path.write_bytes(CKPT_BYTES[:-1] + b"x")  # changed behind our back (a partial copy, a swapped file)
    with pytest.raises(CheckpointError, match="changed since") as info:
        resolve_checkpoint("hiera_t", None, model_dir)
    assert hashlib.sha256(CKPT_BYTES).hexdigest() in str(info.value)


def test_download_follows_redirects_on_its_own_host_and_refuses_others(image_server, tmp_path):
    image_server.add("/real.pt", CKPT_BYTES)
    image_server.redirects["/moved.pt"] = (302, "/real.pt")
    image_server.redirects["/away.pt"] = (302, f"http://localhost:{image_server.port}/real.pt")
    digest = hashlib.sha256(CKPT_BYTES).hexdigest()
    target = tmp_path / "checkpoints" / "moved.pt"
    download_official(OfficialCheckpoint("l0", image_server.url + "/moved.pt", digest), target)
    assert target.read_bytes() == CKPT_BYTES
    away = tmp_path / "checkpoints" / "away.pt"
    with pytest.raises(CheckpointError, match="redirected the checkpoint download to 'localhost'"):
        download_official(OfficialCheckpoint("l0", image_server.url + "/away.pt", digest), away)
    assert not away.exists()
    assert ("/real.pt", None) in image_server.requests and len(image_server.requests) == 3  # never fetched via localhost
