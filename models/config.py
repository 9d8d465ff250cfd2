"""Frozen, JSON-safe configuration dataclasses for InfoDiffusion.

Every constructor argument of the networks, the diffusion process, the loss and the training loop lives in one of
these dataclasses. They validate themselves in ``__post_init__`` (clear ``ValueError`` with the offending field) and
round-trip through plain JSON with ``to_dict()`` / ``from_dict()``, so they can be saved next to the weights and logged
as run parameters.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "UNetConfig",
    "EncoderConfig",
    "DiffusionConfig",
    "LossConfig",
    "InfoDiffusionConfig",
    "TrainConfig",
    "PreprocessSpec",
]


def _scalar(value: Any, hint: type, where: str) -> Any:
    """Check a JSON scalar against ``int`` / ``float`` / ``bool`` / ``str`` (a bool is never a number)."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Convert a JSON value back to the annotated field type (tuples, nested configs), checking scalar types."""
    if hint in (int, float, bool, str):
        return _scalar(value, hint, where)
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return hint.from_dict(value)  # type: ignore[attr-defined]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return value


class _ConfigMixin:
    """``to_dict`` / ``from_dict`` for frozen dataclasses (nested configs and tuples included)."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-safe dict (tuples become lists, nested configs become dicts)."""

        def _plain(v: Any) -> Any:
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return v.to_dict()  # type: ignore[attr-defined]
            if isinstance(v, tuple | list):
                return [_plain(x) for x in v]
            return v

        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build the config from ``to_dict()`` output; unknown keys raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _convert(v, hints[k], f"{cls.__name__}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _check_positive_ints(name: str, values: tuple[int, ...], *, allow_empty: bool = False) -> None:
    if not allow_empty and len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must contain positive integers, got {values!r}")


@dataclass(frozen=True)
class UNetConfig(_ConfigMixin):
    """The denoiser eps_theta(x_t, t, z): a DDPM U-Net with adaptive GroupNorm conditioning.

    Attributes:
        base_channels: width of the first level (``ch``); the time embedding is ``4 * ch`` wide.
        channel_mult: width multiplier per resolution level; level ``i`` works at ``image_size / 2**i``.
        num_res_blocks: residual blocks per level on the down path (the up path has one more).
        attn_resolutions: spatial sizes (in pixels) at which a self-attention block follows each res block.
            The middle block always has one attention layer.
        dropout: dropout probability inside residual blocks.
        num_groups: GroupNorm groups; every level's width must be divisible by it.
    """

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.1
    num_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.base_channels <= 0:
            raise ValueError(f"UNetConfig.base_channels must be > 0, got {self.base_channels}")
        _check_positive_ints("UNetConfig.channel_mult", self.channel_mult)
        _check_positive_ints("UNetConfig.attn_resolutions", self.attn_resolutions, allow_empty=True)
        if self.num_res_blocks < 1:
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_groups < 1:
            raise ValueError(f"UNetConfig.num_groups must be >= 1, got {self.num_groups}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(
                    f"UNetConfig: width {self.base_channels * m} (base_channels * {m}) is not divisible by "
                    f"num_groups={self.num_groups}"
                )


ENCODER_KINDS = ("down", "unet", "pretrained")


@dataclass(frozen=True)
class EncoderConfig(_ConfigMixin):
    """The semantic encoder q_phi(z | x0).

    Attributes:
        kind: ``"down"`` = DiffAE-style down-sampling conv net, global average pooling, Linear to ``d_z`` (cheap);
            ``"unet"`` = the reference's full U-Net without time input, a 1-channel full-resolution map, then
            Linear(H*W -> d_z); ``"pretrained"`` = a frozen ImageNet backbone (``models.backbone``) reads the cell
            at ``backbone_size`` px, and a trainable head maps its pooled multi-level features to ``d_z``
            (``models.encoder.FeatureHead``). The conv fields below are ignored for ``"pretrained"``.
        base_channels: width of the first level.
        channel_mult: width multiplier per level.
        num_res_blocks: residual blocks per level.
        attn_resolutions: resolutions with self-attention (``"unet"`` kind only; ``"down"`` ignores it).
        dropout: dropout inside residual blocks.
        num_groups: GroupNorm groups.
        stochastic: add the optional Gaussian head (mu, log sigma^2); z is then the reparameterised sample in training
            and mu at inference. Default False: the reference's InfoDiffusion setting uses a deterministic z.
        backbone: the pretrained backbone's name (``"pretrained"`` kind; ``models.backbone.BACKBONES``).
        backbone_size: the side in px at which the backbone reads the cell (``"pretrained"`` kind).
        head_hidden: width of the head's residual MLP (``"pretrained"`` kind).
    """

    kind: str = "down"
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    num_groups: int = 8
    stochastic: bool = False
    backbone: str = "efficientnet-lite0"
    backbone_size: int = 256
    head_hidden: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderConfig.kind must be one of {ENCODER_KINDS}, got {self.kind!r}")
        if self.backbone_size < 32 or self.head_hidden < 1:
            raise ValueError(f"EncoderConfig needs backbone_size >= 32 and head_hidden >= 1, got "
                             f"{self.backbone_size}, {self.head_hidden}")
        if self.base_channels <= 0:
            raise ValueError(f"EncoderConfig.base_channels must be > 0, got {self.base_channels}")
        _check_positive_ints("EncoderConfig.channel_mult", self.channel_mult)
        _check_positive_ints("EncoderConfig.attn_resolutions", self.attn_resolutions, allow_empty=True)
        if self.num_res_blocks < 1:
            raise ValueError(f"EncoderConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncoderConfig.dropout must be in [0, 1), got {self.dropout}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(
                    f"EncoderConfig: width {self.base_channels * m} is not divisible by num_groups={self.num_groups}"
                )


@dataclass(frozen=True)
class DiffusionConfig(_ConfigMixin):
    """The forward (noising) process.

    Attributes:
        num_timesteps: T. Training timesteps are t in {0, ..., T-1}.
        schedule: ``"linear"`` (beta_start..beta_end, the reference's 1e-5..1e-2) or ``"cosine"`` (Nichol & Dhariwal;
            beta_start / beta_end are ignored).
        beta_start: first beta of the linear schedule.
        beta_end: last beta of the linear schedule.
    """

    num_timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-5
    beta_end: float = 1e-2

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError(f"DiffusionConfig.num_timesteps must be >= 2, got {self.num_timesteps}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"DiffusionConfig.schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"DiffusionConfig needs 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )


PRIOR_KINDS = ("gaussian", "mixture")
MMD_BANDWIDTHS = ("reference", "dim")


@dataclass(frozen=True)
class LossConfig(_ConfigMixin):
    """Weights of the InfoDiffusion objective (all terms minimised).

    total = eps_mse + lambda_mmd * MMD^2(q(z), p(z)) + (1 - zeta) * KL(q(z|x0) || p(z)) [+ L_rec / T]

    ``lambda_mmd`` is the coefficient of the divergence D, i.e. the paper's (lambda + zeta - 1), which equals lambda
    at zeta = 1 (the reference's ``--mmd_weight``). The KL term exists only with a stochastic encoder head.

    Attributes:
        lambda_mmd: weight of the MMD prior regulariser (reference default 0.1).
        zeta: mutual-information weight; (1 - zeta) weights the per-sample KL (reference default 1: no KL).
        prior: ``"gaussian"`` (N(0, I)) or ``"mixture"`` (the reference's ``10mix``: 10 Gaussians on a circle per pair
            of dimensions; needs an even latent_dim). Used by the MMD term and by ``InfoDiffusion.sample``.
        use_rec_term: add the reference's L_rec / T term (off by default, see ``InfoDiffusion.loss``).
        mmd_bandwidth: RBF kernel of the MMD term, k(u, v) = exp(-||u - v||^2 / c) with c = d^2 for ``"reference"``
            (default; the InfoVAE / InfoDiffusion reference code) or c = 2 d for ``"dim"`` (a Gaussian kernel with
            sigma^2 = d, matched to the N(0, I) prior's scale, where E||u - v||^2 = 2 d). Configs saved before this
            field existed load with ``"reference"``.

    Why ``"dim"`` exists: the reference kernel is so wide at large d that the MMD term is nearly blind. At d = 32 the
    mean kernel value between two prior samples is 0.94 (E||u - v||^2 = 64 against c = 1024), so a code collapsed
    near 0 (z ~ 0.06 N(0, I)) has a population MMD^2 of only ~0.001 against N(0, I) (~1e-4 after lambda_mmd = 0.1).
    Worse, the biased V-statistic that training minimises at batch 32 has a **lower** expectation for that collapsed
    code (~0.0029) than for codes drawn from the prior itself (~0.0038): the term rewards collapse, and its expected
    value is flat for any isotropic scale below ~0.2. With ``"dim"`` the same numbers are ~0.155 (population) and
    0.175 (collapsed, batch 32) vs 0.039 (prior, batch 32); the minimising isotropic scale is ~0.97.
    (Closed form: E exp(-||x||^2 / c) = (1 + 2 v / c)^(-d / 2) for x ~ N(0, v I_d).)
    """

    lambda_mmd: float = 0.1
    zeta: float = 1.0
    prior: str = "gaussian"
    use_rec_term: bool = False
    mmd_bandwidth: str = "reference"

    def __post_init__(self) -> None:
        if self.lambda_mmd < 0:
            raise ValueError(f"LossConfig.lambda_mmd must be >= 0, got {self.lambda_mmd}")
        if not 0.0 <= self.zeta <= 1.0:
            raise ValueError(f"LossConfig.zeta must be in [0, 1] (KL weight is 1 - zeta), got {self.zeta}")
        if self.prior not in PRIOR_KINDS:
            raise ValueError(f"LossConfig.prior must be one of {PRIOR_KINDS}, got {self.prior!r}")
        if self.mmd_bandwidth not in MMD_BANDWIDTHS:
            raise ValueError(
                f"LossConfig.mmd_bandwidth must be one of {MMD_BANDWIDTHS}, got {self.mmd_bandwidth!r}"
            )


@dataclass(frozen=True)
class InfoDiffusionConfig(_ConfigMixin):
    """Everything needed to build an ``InfoDiffusion`` model.

    Attributes:
        image_size: square input size H = W in pixels.
        in_channels: image channels C (1 = grayscale).
        latent_dim: d_z, the size of the semantic code z.
        unet: denoiser config.
        encoder: encoder config.
        diffusion: noise schedule config.
        loss: objective weights.
    """

    image_size: int = 32
    in_channels: int = 1
    latent_dim: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.image_size < 4:
            raise ValueError(f"InfoDiffusionConfig.image_size must be >= 4, got {self.image_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"InfoDiffusionConfig.in_channels must be 1 or 3, got {self.in_channels}")
        if self.latent_dim < 1:
            raise ValueError(f"InfoDiffusionConfig.latent_dim must be >= 1, got {self.latent_dim}")
        checked = [("unet", self.unet.channel_mult)]
        if self.encoder.kind != "pretrained":
            checked.append(("encoder", self.encoder.channel_mult))
        for name, mult in checked:
            factor = 2 ** (len(mult) - 1)
            if self.image_size % factor:
                raise ValueError(
                    f"InfoDiffusionConfig: image_size {self.image_size} is not divisible by {factor} "
                    f"(2 ** (len({name}.channel_mult) - 1))"
                )
        if self.loss.prior == "mixture" and self.latent_dim % 2:
            raise ValueError(f"the 'mixture' prior needs an even latent_dim, got {self.latent_dim}")


@dataclass(frozen=True)
class TrainConfig(_ConfigMixin):
    """Optimisation settings for ``models.train.train``.

    Attributes:
        steps: total optimiser steps.
        batch_size: images per step.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up length, then cosine decay to 0 at ``steps``.
        weight_decay: AdamW weight decay (reference 1e-5).
        grad_clip: global gradient-norm clip (reference 1.0); 0 disables.
        ema_decay: EMA decay of the inference weights (warmed up as min(decay, (1+s)/(10+s))).
        checkpoint_every: save a checkpoint every N steps (and always at the end).
        log_every: append to the history every N steps.
        seed: RNG seed for init, batches, timesteps and noise.
        amp: mixed precision autocast on CUDA (bf16 where supported, else fp16); ignored on CPU.
    """

    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(
                f"TrainConfig.batch_size must be >= 2 (the MMD needs a batch), got {self.batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("TrainConfig.checkpoint_every and log_every must be >= 1")


RESAMPLE_MODES = ("bilinear", "bicubic", "area")


@dataclass(frozen=True)
class PreprocessSpec(_ConfigMixin):
    """How raw camera images become model input (saved with every checkpoint).

    Attributes:
        image_size: output H = W.
        channels: output channels (1 = grayscale; RGB input is converted with fixed luma weights).
        resample: ``"bilinear"`` / ``"bicubic"`` (antialiased) or ``"area"`` (box averaging).
    """

    image_size: int = 32
    channels: int = 1
    resample: str = "area"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"PreprocessSpec.image_size must be >= 1, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"PreprocessSpec.channels must be 1 or 3, got {self.channels}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(
                f"PreprocessSpec.resample must be one of {RESAMPLE_MODES}, got {self.resample!r}"
            )
