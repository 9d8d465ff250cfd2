"""InfoDiffusion: semantic encoder q_phi(z|x0) + z-conditioned DDPM denoiser eps_theta(x_t, t, z).

The composite ``nn.Module`` owns the two networks and the noise schedule (as non-persistent buffers, rebuilt from
the config); the diffusion maths and samplers it calls are parameter-free functions in ``diffusion.py`` and
``samplers.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import InfoDiffusionConfig
from .diffusion import EpsFn, q_sample, randn
from .encoder import Encoder, EncoderOutput
from .losses import kl_normal, mmd, sample_prior
from .preprocess import check_model_input
from .samplers import DDIMSampler, DDPMSampler, ddim_invert_loop, ddim_sample_loop
from .schedule import NoiseSchedule, register_schedule, schedule_from_buffers
from .unet import UNet

__all__ = ["LossOutput", "InfoDiffusion"]


@dataclass(frozen=True)
class LossOutput:
    """The training objective and its parts (scalar tensors; ``total`` carries the gradient).

    Attributes:
        total: eps_mse + lambda_mmd * mmd + (1 - zeta) * kl [+ rec / T].
        eps_mse: the simple DDPM loss, mean over all elements of (eps_hat - eps)^2.
        mmd: MMD^2(z, prior sample). Always computed (for monitoring), even when lambda_mmd = 0.
        kl: per-sample KL(q(z|x0) || N(0, I)) averaged over the batch; 0 (a constant) with the deterministic
            encoder, where it is undefined and omitted from ``total``.
        rec: the reference's L_rec (before the 1/T factor); 0 (a constant) unless ``use_rec_term``.
    """

    total: torch.Tensor
    eps_mse: torch.Tensor
    mmd: torch.Tensor
    kl: torch.Tensor
    rec: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """The terms as Python floats (for logging)."""
        return {k: float(getattr(self, k).detach()) for k in ("total", "eps_mse", "mmd", "kl", "rec")}


class InfoDiffusion(nn.Module):
    """InfoDiffusion (Wang et al., ICML 2023) for (B, C, H, W) images in [-1, 1].

    Args:
        cfg: the full model config.
    """

    def __init__(self, cfg: InfoDiffusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.image_size, cfg.in_channels, cfg.latent_dim)
        self.unet = UNet(
            cfg.unet, cfg.image_size, cfg.in_channels, cfg.in_channels, latent_dim=cfg.latent_dim
        )
        register_schedule(self, cfg.diffusion)

    # ------------------------------------------------------------------ basics
    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule as a ``NoiseSchedule`` view of the buffers (on the module's device)."""
        return schedule_from_buffers(self)

    @property
    def num_timesteps(self) -> int:
        """T."""
        return self.cfg.diffusion.num_timesteps

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t, z): (B,C,H,W), (B,), (B,d_z) -> (B,C,H,W)."""
        return self.unet(x_t, t, z)

    def eps_fn(self, z: torch.Tensor) -> EpsFn:
        """The denoiser with z bound and held fixed: ``(x_t, t) -> eps``; z is broadcast over the batch if (1, d)."""

        def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            zz = z.expand(x_t.shape[0], -1) if z.shape[0] == 1 else z
            return self.unet(x_t, t, zz)

        return fn

    @property
    def uses_features(self) -> bool:
        """True when the encoder reads pooled backbone features (kind ``"pretrained"``) instead of the image."""
        return self.cfg.encoder.kind == "pretrained"

    @property
    def feature_dim(self) -> int | None:
        """F, the length of the pooled feature vector the encoder reads (None for image encoders)."""
        return self.encoder.head.feat_mean.shape[0] if self.uses_features else None

    def check_features(self, features: torch.Tensor | None, batch: int | None = None) -> torch.Tensor:
        """Validate pooled backbone features (B, F) for the ``"pretrained"`` encoder; returns them as float32."""
        if features is None:
            raise ValueError(
                "this model's encoder is 'pretrained': it reads pooled backbone features, not the 32 px image; "
                f"pass features=(B, {self.feature_dim}) from models.backbone (or pipeline.features), or pass z"
            )
        if features.ndim != 2 or features.shape[1] != self.feature_dim or (
                batch is not None and features.shape[0] != batch):
            raise ValueError(f"features must be (B, {self.feature_dim})"
                             f"{'' if batch is None else f' with B = {batch}'}, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        return features.float()

    def encode_full(self, x: torch.Tensor | None, generator: torch.Generator | None = None, *,
                    features: torch.Tensor | None = None) -> EncoderOutput:
        """The full encoder output (z, mu, logvar) for a validated batch (images, or features when pretrained)."""
        if self.uses_features:
            return self.encoder(self.check_features(features, None if x is None else x.shape[0]),
                                generator=generator)
        check_model_input(x, self.cfg)
        return self.encoder(x, generator=generator)

    def encode(self, x: torch.Tensor | None, *, grad: bool = False, features: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The semantic code used for monitoring: (B, C, H, W) -> z (B, d_z).

        Deterministic: the encoder output, or mu with the stochastic head (also in training mode). Call ``eval()``
        first if the encoder has dropout.

        Args:
            x: images in [-1, 1] (may be None for the ``"pretrained"`` encoder).
            grad: keep the autograd graph (default: no_grad, which is faster).
            features: (B, F) pooled backbone features; required by (and only used by) the ``"pretrained"`` encoder.
        """
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = self.encode_full(x, features=features)
            return out.mu if out.mu is not None else out.z

    def _check_z(self, z: torch.Tensor, batch: int) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.cfg.latent_dim or z.shape[0] not in (1, batch):
            raise ValueError(
                f"z must be (B, {self.cfg.latent_dim}) with B = {batch} (or 1), got {tuple(z.shape)}"
            )
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or infinite values")
        return z

    # ------------------------------------------------------------------ objective
    def loss(
        self,
        x: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        features: torch.Tensor | None = None,
    ) -> LossOutput:
        """The InfoDiffusion training objective for one batch (all terms minimised).

        total = eps_mse + lambda_mmd * MMD^2(z, y ~ p(z)) + (1 - zeta) * KL(q(z|x0) || N(0, I)) [+ L_rec / T]

        * t ~ U{0..T-1} and eps ~ N(0, I) per example, x_t = q_sample(x0, t, eps); z = Enc(x0) sees the **clean**
          image; eps_mse = mean (eps_theta(x_t, t, z) - eps)^2 (the unweighted "simple" DDPM loss).
        * MMD: biased V-statistic with the ``lc.mmd_bandwidth`` kernel (default: the reference's) against a **fresh**
          prior batch of the same size, on the conditioning code z (the reparameterised sample with the stochastic
          head, i.e. a sample of the aggregate posterior q(z)).
        * KL: only with the stochastic (Gaussian) encoder head; with the deterministic encoder it is undefined and
          omitted. Hence lambda_mmd = zeta = 0 with the deterministic encoder is exactly the DiffAE ablation
          (``total == eps_mse``).
        * L_rec / T (``use_rec_term``, off by default): the reference applies the t = 1 posterior-mean formula
          x0_hat = (x0 - beta_1 / sqrt(1 - abar_1) eps_hat) / sqrt(alpha_1) to the *clean* x0 with eps_hat predicted
          at a *random* t. That is not log p(x0 | x1, z) (which needs x1 and eps_hat at t = 1); with beta_1 = 1e-5 the
          term is ~1e-5 * |eps_hat|^2 / T, so it is both ill-posed and negligible. Kept only for fidelity.

        Args:
            x: (B, C, H, W) images in [-1, 1], B >= 2.
            t: optional (B,) timesteps (default: uniform).
            noise: optional (B, C, H, W) noise (default: standard normal).
            generator: RNG for t, noise, the prior batch and the reparameterisation.
            features: (B, F) pooled backbone features of the same images (``"pretrained"`` encoder only).

        Returns:
            ``LossOutput``.
        """
        check_model_input(x, self.cfg)
        b, dev = x.shape[0], x.device
        lc = self.cfg.loss
        sched = self.schedule
        if t is None:
            gdev = generator.device if generator is not None else dev
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=gdev).to(dev)
        if noise is None:
            noise = randn(x.shape, generator, dev, x.dtype)
        enc = self.encode_full(x, generator, features=features) if self.uses_features else \
            self.encoder(x, generator=generator)
        z = enc.z
        x_t = q_sample(sched, x, t, noise)
        eps_hat = self.unet(x_t, t, z)
        eps_mse = (eps_hat.float() - noise.float()).pow(2).mean()
        total = eps_mse

        prior = sample_prior(b, self.cfg.latent_dim, lc.prior, generator=generator, device=dev)
        if lc.lambda_mmd > 0:
            mmd_val = mmd(z.float(), prior, lc.mmd_bandwidth)
            total = total + lc.lambda_mmd * mmd_val
        else:
            with torch.no_grad():
                mmd_val = mmd(z.detach().float(), prior, lc.mmd_bandwidth)

        zero = torch.zeros((), device=dev)
        kl_val = zero
        if enc.mu is not None and enc.logvar is not None:
            kl_val = kl_normal(enc.mu.float(), enc.logvar.float())
            if lc.zeta < 1.0:
                total = total + (1.0 - lc.zeta) * kl_val

        rec_val = zero
        if lc.use_rec_term:
            a1, b1, ab1 = sched.alphas[0], sched.betas[0], sched.alphas_cumprod[0]
            x0_hat = (x - b1 / (1 - ab1).sqrt() * eps_hat.float()) / a1.sqrt()
            rec_val = (x0_hat - x).pow(2).mean()
            total = total + rec_val / self.num_timesteps
        return LossOutput(total=total, eps_mse=eps_mse, mmd=mmd_val, kl=kl_val, rec=rec_val)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def ddim_invert(self, x0: torch.Tensor, z: torch.Tensor | None = None, steps: int = 50) -> torch.Tensor:
        """Deterministic DDIM inversion x0 -> x_T with z = Enc(x0) held **fixed** at every step.

        (The reference re-encodes z from the noisy iterate at each step: a bug, not copied.)

        Args:
            x0: (B, C, H, W) images in [-1, 1].
            z: (B, d_z) or (1, d_z) code; default Enc(x0).
            steps: DDIM steps (use the same number to decode).

        Returns:
            (B, C, H, W) x_T.
        """
        check_model_input(x0, self.cfg)
        z = self.encode(x0) if z is None else self._check_z(z, x0.shape[0])
        return ddim_invert_loop(self.eps_fn(z), x0, DDIMSampler(self.schedule, steps))

    @torch.no_grad()
    def ddim_sample(
        self,
        x_T: torch.Tensor,
        z: torch.Tensor,
        steps: int = 50,
        eta: float = 0.0,
        *,
        clip_x0: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode x_T -> x0 with strided DDIM conditioned on z.

        Args:
            x_T: (B, C, H, W) start noise / inverted code.
            z: (B, d_z) or (1, d_z) semantic code.
            steps: DDIM steps.
            eta: 0 = deterministic.
            clip_x0: clamp the x0 estimate at every step (use for sampling from noise, not for reconstruction).
            generator: RNG for eta > 0.

        Returns:
            (B, C, H, W) images clamped to [-1, 1].
        """
        z = self._check_z(z, x_T.shape[0])
        sampler = DDIMSampler(self.schedule, steps, eta=eta, clip_x0=clip_x0)
        return ddim_sample_loop(self.eps_fn(z), x_T, sampler, generator=generator).clamp(-1, 1)

    @torch.no_grad()
    def ddpm_sample(
        self,
        z: torch.Tensor,
        *,
        x_T: torch.Tensor | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral DDPM sampling conditioned on z (all T steps by default; fewer = respaced).

        Args:
            z: (B, d_z) codes.
            x_T: optional (B, C, H, W) start noise (default N(0, I)).
            steps: number of steps (default T).
            generator: RNG for x_T and the per-step noise.

        Returns:
            (B, C, H, W) images clamped to [-1, 1].
        """
        z = self._check_z(z, z.shape[0])
        if x_T is None:
            x_T = randn(self._image_shape(z.shape[0]), generator, z.device)
        sampler = DDPMSampler(self.schedule, steps)
        return ddim_sample_loop(self.eps_fn(z), x_T, sampler, generator=generator).clamp(-1, 1)

    def _image_shape(self, n: int) -> tuple[int, int, int, int]:
        c, s = self.cfg.in_channels, self.cfg.image_size
        return (n, c, s, s)

    @torch.no_grad()
    def reconstruct(self, x0: torch.Tensor, steps: int = 50, z: torch.Tensor | None = None) -> torch.Tensor:
        """Autoencode: DDIM-invert x0 with z = Enc(x0), then decode from (x_T, z). (B,C,H,W) -> (B,C,H,W)."""
        check_model_input(x0, self.cfg)
        z = self.encode(x0) if z is None else self._check_z(z, x0.shape[0])
        x_T = self.ddim_invert(x0, z, steps)
        return self.ddim_sample(x_T, z, steps)

    @torch.no_grad()
    def traverse(
        self, x0: torch.Tensor, axes: list[int], values: torch.Tensor, steps: int = 20, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Latent traversal: set z_k to each value (absolute replacement, as in the paper), decode from the same x_T.

        Args:
            x0: (1, C, H, W) one image.
            axes: latent dimensions k to traverse.
            values: (V,) values for z_k.
            steps: DDIM steps for inversion and decoding.
            z: optional (1, d_z) code of x0 (default Enc(x0); required by the ``"pretrained"`` encoder).

        Returns:
            (A, V, C, H, W) decoded images.
        """
        check_model_input(x0, self.cfg)
        if x0.shape[0] != 1:
            raise ValueError(f"traverse takes one image (1, C, H, W), got batch {x0.shape[0]}")
        values = torch.as_tensor(values, dtype=torch.float32, device=x0.device).flatten()
        if values.numel() == 0 or not axes:
            raise ValueError("traverse needs at least one axis and one value")
        bad = [a for a in axes if not 0 <= int(a) < self.cfg.latent_dim]
        if bad:
            raise ValueError(f"axes {bad} out of range [0, {self.cfg.latent_dim})")
        z = self.encode(x0) if z is None else self._check_z(z, 1)
        x_T = self.ddim_invert(x0, z, steps)
        n_v = values.numel()
        out = []
        for a in axes:
            zs = z.repeat(n_v, 1)
            zs[:, int(a)] = values
            out.append(self.ddim_sample(x_T.expand(n_v, -1, -1, -1), zs, steps))
        return torch.stack(out)

    @torch.no_grad()
    def interpolate(
        self, x0_a: torch.Tensor, x0_b: torch.Tensor, n: int = 10, steps: int = 50, z_mode: str = "cos",
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Interpolate between two images: slerp on x_T, cos/sin (or linear) mixing of z, as in the reference.

        z(e) = cos(e pi/2) z_a + sin(e pi/2) z_b (``"cos"``) or (1 - e) z_a + e z_b (``"linear"``); e in linspace(0, 1, n).

        Args:
            x0_a: (1, C, H, W) first image.
            x0_b: (1, C, H, W) second image.
            n: number of frames (>= 2), endpoints included.
            steps: DDIM steps.
            z_mode: ``"cos"`` or ``"linear"``.
            z: optional (2, d_z) codes of the two images (required by the ``"pretrained"`` encoder).

        Returns:
            (n, C, H, W) decoded frames.
        """
        if z_mode not in ("cos", "linear"):
            raise ValueError(f"z_mode must be 'cos' or 'linear', got {z_mode!r}")
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n}")
        for x in (x0_a, x0_b):
            check_model_input(x, self.cfg)
            if x.shape[0] != 1:
                raise ValueError(f"interpolate takes single images (1, C, H, W), got batch {x.shape[0]}")
        xs = torch.cat([x0_a, x0_b])
        z = self.encode(xs) if z is None else self._check_z(z, 2)
        x_T = self.ddim_invert(xs, z, steps)
        e = torch.linspace(0, 1, n, device=xs.device)[:, None]
        if z_mode == "cos":
            zi = torch.cos(e * math.pi / 2) * z[0] + torch.sin(e * math.pi / 2) * z[1]
        else:
            zi = (1 - e) * z[0] + e * z[1]
        a, b = x_T[0].flatten(), x_T[1].flatten()
        theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
        if float(theta) < 1e-4:
            xi = (1 - e) * a + e * b
        else:
            xi = (torch.sin((1 - e) * theta) * a + torch.sin(e * theta) * b) / torch.sin(theta)
        return self.ddim_sample(xi.reshape(n, *x_T.shape[1:]), zi, steps)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int = 50,
        generator: torch.Generator | None = None,
        *,
        z: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Unconditional samples: z from the configured prior (unless given), x_T ~ N(0, I), DDIM with x0 clipping.

        Args:
            n: number of images.
            steps: DDIM steps.
            generator: RNG for z, x_T and eta noise.
            z: optional (n, d_z) codes.
            eta: DDIM eta.

        Returns:
            (n, C, H, W) images in [-1, 1].
        """
        dev = self.sched_betas.device
        if z is None:
            z = sample_prior(n, self.cfg.latent_dim, self.cfg.loss.prior, generator=generator, device=dev)
        x_T = randn(self._image_shape(n), generator, dev)
        return self.ddim_sample(x_T, z, steps, eta, clip_x0=True, generator=generator)

    @torch.no_grad()
    def partial_denoise(
        self,
        x0: torch.Tensor,
        t_start: int,
        steps: int,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise x0 to level ``t_start`` (q_sample), then DDIM-denoise back to t = 0 conditioned on z = Enc(x0).

        The AnoDDPM-style anomaly score compares x0 with the result: in-distribution detail is restored, anomalies
        are "healed" towards what the model expects for this z.

        Args:
            x0: (B, C, H, W) images in [-1, 1].
            t_start: noise level in [0, T).
            steps: DDIM steps between t_start and 0 (1..t_start+1).
            z: optional (B, d_z) codes (default Enc(x0)).
            generator: RNG for the forward noise.
            noise: the forward noise itself, broadcastable to x0 (e.g. one (1, C, H, W) field shared by the batch,
                so an image's result does not depend on its batch); overrides ``generator``.

        Returns:
            (B, C, H, W) x0_hat clamped to [-1, 1].
        """
        check_model_input(x0, self.cfg)
        z = self.encode(x0) if z is None else self._check_z(z, x0.shape[0])
        sampler = DDIMSampler(self.schedule, steps, t_start=t_start)
        t = torch.full((x0.shape[0],), int(t_start), dtype=torch.long, device=x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        else:
            noise = noise.to(device=x0.device, dtype=x0.dtype).expand_as(x0)
        x_t = q_sample(self.schedule, x0, t, noise)
        return ddim_sample_loop(self.eps_fn(z), x_t, sampler).clamp(-1, 1)
