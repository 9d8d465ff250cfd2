"""The ``"pretrained"`` encoder kind: head on pooled backbone features -> z; decoder on the small image."""

from __future__ import annotations

import json

import pytest
import torch

from models import get_preset, load_checkpoint, train
from models.backbone import BACKBONE_ID
from models.config import EncoderConfig


def _pretrained_tiny():
    base = get_preset("tiny")
    enc = EncoderConfig(kind="pretrained", head_hidden=32)
    return base.__class__(base.name, base.model.replace(encoder=enc), base.train, base.preprocess)


def _features(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 472, generator=g) * 2.0 + 1.0


def test_pretrained_preset_reads_features_not_images() -> None:
    from models import InfoDiffusion

    preset = get_preset("pretrained")
    model = InfoDiffusion(preset.model)
    assert model.uses_features and model.feature_dim == 472
    x = torch.zeros(2, 1, preset.model.image_size, preset.model.image_size)
    with pytest.raises(ValueError, match="pooled backbone features"):
        model.encode(x)
    assert model.encode(x, features=_features(2)).shape == (2, preset.model.latent_dim)
    with pytest.raises(ValueError, match=r"features must be \(B, 472\)"):
        model.encode(x, features=_features(3))


def test_training_touches_head_and_decoder_and_checkpoint_records_backbone(elpv16: torch.Tensor, tmp_path) -> None:
    preset = _pretrained_tiny()
    feats = _features(elpv16.shape[0])
    res = train(preset, elpv16, tmp_path / "ckpt", steps=20, progress=False, device="cpu", features=feats)
    head = res.model.encoder.head
    torch.testing.assert_close(head.feat_mean, feats.mean(0), atol=1e-5, rtol=1e-5)  # data-dependent init
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert BACKBONE_ID in json.dumps(meta)
    ck = load_checkpoint(tmp_path / "ckpt")
    z1 = ck.model.encode(None, features=feats[:4])
    z2 = res.model.encode(None, features=feats[:4])
    torch.testing.assert_close(z1, z2)


def test_checkpoint_of_another_backbone_is_refused(elpv16: torch.Tensor, tmp_path) -> None:
    preset = _pretrained_tiny()
    train(preset, elpv16, tmp_path / "ckpt", steps=2, progress=False, device="cpu", features=_features(elpv16.shape[0]))
    path = tmp_path / "ckpt" / "config.json"
    text = path.read_text().replace(BACKBONE_ID, "efficientnet-lite0@300px-pool4-patch15-000000000000")
    path.write_text(text)
    with pytest.raises(ValueError, match="trained on backbone"):
        load_checkpoint(tmp_path / "ckpt")


def test_pretrained_training_needs_features(elpv16: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="pooled backbone features"):
        train(_pretrained_tiny(), elpv16, None, steps=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match="only for the 'pretrained'"):
        train(get_preset("tiny"), elpv16, None, steps=1, progress=False, device="cpu", features=_features(32))
