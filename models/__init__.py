"""InfoDiffusion in torch: networks, diffusion maths, samplers, training, checkpoints, tensor preprocessing.

Imports torch (and numpy) only. See ``docs/architecture.md`` for the contract.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import (
    DiffusionConfig,
    EncoderConfig,
    InfoDiffusionConfig,
    LossConfig,
    PreprocessSpec,
    TrainConfig,
    UNetConfig,
)
from .encoder import Encoder, EncoderOutput
from .infodiffusion import InfoDiffusion, LossOutput
from .latent import LatentDDPM, LatentDDPMConfig, load_latent_ddpm, save_latent_ddpm, train_latent_ddpm
from .losses import kl_normal, mmd, rbf_kernel, sample_prior
from .preprocess import check_model_input, to_model_input
from .presets import PRESETS, Preset, get_preset
from .samplers import DDIMSampler, DDPMSampler, StepOutput
from .schedule import NoiseSchedule
from .train import TrainResult, train
from .unet import UNet

__all__ = [
    "InfoDiffusionConfig",
    "UNetConfig",
    "EncoderConfig",
    "DiffusionConfig",
    "LossConfig",
    "TrainConfig",
    "PreprocessSpec",
    "Preset",
    "get_preset",
    "PRESETS",
    "InfoDiffusion",
    "LossOutput",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
    "train",
    "TrainResult",
    "to_model_input",
    "check_model_input",
    "NoiseSchedule",
    "DDIMSampler",
    "DDPMSampler",
    "StepOutput",
    "mmd",
    "rbf_kernel",
    "kl_normal",
    "sample_prior",
    "Encoder",
    "EncoderOutput",
    "UNet",
    "LatentDDPM",
    "LatentDDPMConfig",
    "train_latent_ddpm",
    "save_latent_ddpm",
    "load_latent_ddpm",
]
