"""Named presets: model + training + preprocessing settings as plain functions (diffae ``templates.py`` style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import (
    DiffusionConfig,
    EncoderConfig,
    InfoDiffusionConfig,
    LossConfig,
    PreprocessSpec,
    TrainConfig,
    UNetConfig,
)

__all__ = ["Preset", "tiny", "cpu", "pretrained", "standard", "large", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A named, complete recipe.

    Attributes:
        name: preset name.
        model: model config.
        train: training config.
        preprocess: how raw images are converted (must match ``model`` size and channels).
    """

    name: str
    model: InfoDiffusionConfig
    train: TrainConfig
    preprocess: PreprocessSpec

    def __post_init__(self) -> None:
        if (
            self.preprocess.image_size != self.model.image_size
            or self.preprocess.channels != self.model.in_channels
        ):
            raise ValueError(
                f"preset {self.name!r}: preprocess ({self.preprocess.image_size} px, {self.preprocess.channels} ch) "
                f"does not match the model ({self.model.image_size} px, {self.model.in_channels} ch)"
            )


def tiny() -> Preset:
    """16 px, a few thousand parameters per level: unit tests (seconds on a laptop CPU)."""
    model = InfoDiffusionConfig(
        image_size=16,
        in_channels=1,
        latent_dim=8,
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0
        ),
        encoder=EncoderConfig(kind="down", base_channels=16, channel_mult=(1, 2), num_res_blocks=1),
        diffusion=DiffusionConfig(),
        loss=LossConfig(),
    )
    train = TrainConfig(
        steps=300, batch_size=16, lr=2e-3, warmup_steps=20, ema_decay=0.99, checkpoint_every=100, log_every=10
    )
    return Preset("tiny", model, train, PreprocessSpec(image_size=16, channels=1, resample="area"))


def cpu() -> Preset:
    """32 px, narrow U-Net and the cheap ``down`` encoder: the CPU demo (minutes on 2 cores, already a useful z)."""
    model = InfoDiffusionConfig(
        image_size=32,
        in_channels=1,
        latent_dim=32,
        unet=UNetConfig(
            base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0
        ),
        # slim encoder (6.8 MFLOP/image): encoding must run >= 2,000 images/s on 2 CPU cores
        encoder=EncoderConfig(
            kind="down", base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, num_groups=4
        ),
        diffusion=DiffusionConfig(),
        loss=LossConfig(),
    )
    train = TrainConfig(
        steps=2000,
        batch_size=32,
        lr=1e-3,
        warmup_steps=100,
        ema_decay=0.995,
        checkpoint_every=250,
        log_every=10,
    )
    return Preset("cpu", model, train, PreprocessSpec(image_size=32, channels=1, resample="area"))


def pretrained() -> Preset:
    """The cpu preset's 32 px decoder with the ``"pretrained"`` encoder.

    A frozen EfficientNet-Lite0 reads the cell at 256 px (cached once per image); a trainable head maps its pooled
    features to z (d = 32).
    """
    base = cpu()
    model = base.model.replace(encoder=EncoderConfig(kind="pretrained", backbone="efficientnet-lite0",
                                                     backbone_size=256, head_hidden=256))
    return Preset("pretrained", model, base.train, base.preprocess)


def standard() -> Preset:
    """64 px, reference-like widths (ch 64, (1, 2, 2, 2), attention at 16 px): a GPU run."""
    model = InfoDiffusionConfig(
        image_size=64,
        in_channels=1,
        latent_dim=32,
        unet=UNetConfig(
            base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
        ),
        # 141 MFLOP/image: encoding must run >= 300 images/s on 2 CPU cores even though training needs a GPU
        encoder=EncoderConfig(kind="down", base_channels=16, channel_mult=(1, 2, 4, 8), num_res_blocks=1),
        diffusion=DiffusionConfig(),
        loss=LossConfig(),
    )
    train = TrainConfig(
        steps=50_000,
        batch_size=64,
        lr=2e-4,
        warmup_steps=1000,
        ema_decay=0.9995,
        checkpoint_every=2000,
        log_every=50,
    )
    return Preset("standard", model, train, PreprocessSpec(image_size=64, channels=1, resample="area"))


def large() -> Preset:
    """128 px, ch 128 (1, 1, 2, 2, 4): a long GPU run for fine crack detail."""
    model = InfoDiffusionConfig(
        image_size=128,
        in_channels=1,
        latent_dim=64,
        unet=UNetConfig(
            base_channels=128,
            channel_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
            num_groups=32,
        ),
        encoder=EncoderConfig(kind="down", base_channels=64, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=1),
        diffusion=DiffusionConfig(),
        loss=LossConfig(),
    )
    train = TrainConfig(
        steps=200_000,
        batch_size=64,
        lr=1e-4,
        warmup_steps=2000,
        ema_decay=0.9999,
        checkpoint_every=5000,
        log_every=100,
    )
    return Preset("large", model, train, PreprocessSpec(image_size=128, channels=1, resample="area"))


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny": tiny, "cpu": cpu, "pretrained": pretrained, "standard": standard, "large": large,
}
"""Name -> preset factory."""


def get_preset(name: str) -> Preset:
    """Return the named preset.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
