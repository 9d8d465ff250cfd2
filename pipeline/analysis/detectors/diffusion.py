"""A diffusion-native anomaly score: partial noising and denoising with the model itself (AnoDDPM-style).

For an image x0 and a noise level t*, the model's own encoder gives z = Enc(x0); x0 is noised to x_t* (forward
process, fresh Gaussian noise) and DDIM-denoised back to t = 0 conditioned on z
(``InfoDiffusion.partial_denoise``). Detail the model knows how to make for this z is restored; what it has never
seen (a crack, a dark patch, a foreign pattern) is "healed" towards normal, so the residual ``x0 - x0_hat`` is large
on anomalies (Wyatt et al. 2022, AnoDDPM). Small t* keeps more of the image and catches fine defects; larger t*
lets the model re-draw more and catches larger ones. Several t* are combined after standardising each against its
reference residuals: ``score = mean_t (r_t - median_ref_t) / IQR_ref_t``.

Residual reductions (``reduce``):

* ``"mse"`` (default): mean squared pixel residual; the most stable (lowest variance on normal images), and best
  for diffuse changes (noise, blur, intensity);
* ``"l1"``: mean absolute residual; less dominated by a few pixels;
* ``"q99"``: the 99th percentile of the squared residual map; best for small localised defects, which hardly move a
  mean over the whole image, at the cost of a noisier score on normal images.

With a stand-in denoiser that knows normal images are smooth (the tests), all three separate noisy from clean
images, and ``"q99"`` beats ``"mse"`` on a 6-pixel scratch. Which reduction and which t* separate ELPV defect
classes best is for the fault-detection benchmark with the trained model to measure; ``reduce`` and ``t_stars``
are the knobs to set from it.

**Context** (``context``): how a residual is judged.

* ``"z"`` (default): against the ``k`` reference images nearest in z (:class:`pipeline.analysis.detectors.ConditionalResidual`),
  because how large a residual is normal depends on the kind of cell: on ELPV poly cells leave several times the
  residual of mono cells (the gain is measured in BENCHMARKS.md, ``benchmarks/results/bench_anomaly.md``).
* ``"none"``: one global standardisation, ``mean_t (r_t - median_ref_t) / IQR_ref_t``.

The detector works on **images** (float tensors in [-1, 1], (N, C, H, W), from ``models.to_model_input``), not
latents, and follows the same protocol: ``fit(X_ref)`` stores reference residual statistics, ``score(X)``,
``infer_threshold(X_val, fpr)``, ``predict(X)``. The forward noise is one field per (seed, t*), shared by every
image (common random numbers): an image's residual does not depend on its batch or on the other images, so the
monitor can compute it once per image and cache it. Several seeds average out the randomness of the forward noise
(the score's variance falls as 1/len(seeds)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models import check_model_input
from pipeline.analysis.detectors.base import BaseDetector
from pipeline.analysis.detectors.conditional import ConditionalResidual, stack_latents_residuals

__all__ = ["DiffusionResidual", "noise_field"]

_REDUCERS = ("mse", "l1", "q99")
_CONTEXTS = ("z", "none")


def noise_field(shape: Sequence[int], seed: int, t_index: int, device: Any = "cpu") -> torch.Tensor:
    """The forward-noise field (1, C, H, W) shared by every image for one (seed, t* index)."""
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(t_index) * 10_007) % (2**63 - 1))
    return torch.randn((1, *shape), generator=g).to(device)


def _given_codes(Z: Any, n: int) -> torch.Tensor | None:
    """Given codes as a float32 (n, d) tensor (None stays None)."""
    if Z is None:
        return None
    Zt = torch.from_numpy(np.array(Z, dtype=np.float32))  # a copy: given arrays may be read-only
    if Zt.ndim != 2 or Zt.shape[0] != n:
        raise ValueError(f"Z must be (N, d) with one code per image (N = {n}), got {tuple(Zt.shape)}")
    if not torch.isfinite(Zt).all():
        raise ValueError("Z contains NaN or infinite values")
    return Zt


class DiffusionResidual(BaseDetector):
    """Partial-denoising residual score of an InfoDiffusion model.

    Args:
        model: an ``models.InfoDiffusion`` (anything with ``partial_denoise(x0, t_start, steps, z, generator)`` and
            a ``cfg`` with ``in_channels``, ``image_size``, ``diffusion.num_timesteps``).
        t_stars: noise levels t* (0 < t* < T) to noise to.
        steps: DDIM steps from t* back to 0.
        seeds: seeds of the forward noise; residuals are averaged over seeds.
        reduce: ``"mse"``, ``"l1"`` or ``"q99"`` (see module docstring).
        context: ``"z"`` (judge each residual against the ``k`` nearest reference images in z) or ``"none"``.
        k: neighbours for ``context="z"``.
        batch_size: images per model call.
        progress: tqdm bar over batches (hidden when not a TTY).
    """

    name = "DiffusionResidual"
    version = "1"
    input_kind = "image"
    _param_names = ("t_stars", "steps", "seeds", "reduce", "context", "k", "batch_size")

    def __init__(
        self,
        model: Any,
        t_stars: Sequence[int] = (100, 250),
        steps: int = 10,
        seeds: Sequence[int] = (0,),
        reduce: str = "mse",
        context: str = "z",
        k: int = 25,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        if not hasattr(model, "partial_denoise"):
            raise ValueError(f"model must provide partial_denoise(...), got {type(model).__name__}")
        T = int(model.cfg.diffusion.num_timesteps)
        t_stars = tuple(int(t) for t in t_stars)
        if not t_stars or any(not 0 < t < T for t in t_stars):
            raise ValueError(f"t_stars must be non-empty with 0 < t* < T={T}, got {t_stars}")
        if int(steps) < 1 or any(int(steps) > t + 1 for t in t_stars):
            raise ValueError(f"steps must be in 1..min(t_stars)+1, got {steps}")
        if reduce not in _REDUCERS:
            raise ValueError(f"reduce must be one of {_REDUCERS}, got {reduce!r}")
        if context not in _CONTEXTS:
            raise ValueError(f"context must be one of {_CONTEXTS}, got {context!r}")
        if int(k) < 3:
            raise ValueError(f"k must be >= 3, got {k}")
        if len(seeds) == 0:
            raise ValueError("seeds must not be empty")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.t_stars = t_stars
        self.steps = int(steps)
        self.seeds = tuple(int(s) for s in seeds)
        self.reduce = reduce
        self.context = context
        self.k = int(k)
        self.batch_size = int(batch_size)
        self.progress = progress

    # ---- validation ----------------------------------------------------------------------------------------
    def _validate(self, X: Any, name: str) -> torch.Tensor:
        if isinstance(X, np.ndarray):
            if not np.issubdtype(X.dtype, np.floating):
                raise ValueError(
                    f"{name} must be float images in [-1, 1] (use models.to_model_input), got dtype {X.dtype}"
                )
            X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        try:
            check_model_input(X, self.model.cfg)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        return X

    # ---- residuals -----------------------------------------------------------------------------------------
    def _reduce(self, x0: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
        diff = (x0 - xh).float()
        if self.reduce == "mse":
            return diff.pow(2).flatten(1).mean(1)
        if self.reduce == "l1":
            return diff.abs().flatten(1).mean(1)
        return torch.quantile(diff.pow(2).mean(1).flatten(1), 0.99, dim=1)

    def residuals(self, X: Any, Z: Any = None) -> np.ndarray:
        """Raw residuals per image and t*, averaged over seeds.

        Args:
            X: images (N, C, H, W) in [-1, 1].
            Z: the images' codes (N, d); default Enc(x0). A ``"pretrained"`` encoder reads backbone features, not
                the model-size image, so its codes are given (``pipeline.latent.encode.stored_latents``).

        Returns:
            float64 array (N, len(t_stars)).
        """
        return self.latents_and_residuals(X, Z)[1]

    @torch.no_grad()
    def latents_and_residuals(self, X: Any, Z: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Z = Enc(x0) (N, d), or the given codes, and the raw residuals (N, len(t_stars)) in one pass."""
        X = self._validate(X, "X")
        Zt = _given_codes(Z, X.shape[0])
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        n = X.shape[0]
        out = np.zeros((n, len(self.t_stars)))
        zs: list[np.ndarray] = []
        fields = {(s, i): noise_field(X.shape[1:], s, i, device)
                  for s in self.seeds for i in range(len(self.t_stars))}
        batches = list(range(0, n, self.batch_size))
        total = len(batches) * len(self.t_stars) * len(self.seeds)
        bar = tqdm(
            total=total, desc="diffusion residual", disable=None if self.progress else True, leave=False
        )
        try:
            for lo in batches:
                x0 = X[lo : lo + self.batch_size].to(device)
                z = model.encode(x0) if Zt is None else Zt[lo : lo + self.batch_size].to(device)
                zs.append(z.detach().cpu().numpy().astype(np.float64).reshape(x0.shape[0], -1))
                for i, t in enumerate(self.t_stars):
                    acc = torch.zeros(x0.shape[0], device=device)
                    for s in self.seeds:
                        xh = model.partial_denoise(x0, t_start=t, steps=self.steps, z=z, noise=fields[(s, i)])
                        acc += self._reduce(x0, xh)
                        bar.update(1)
                    out[lo : lo + x0.shape[0], i] = (acc / len(self.seeds)).cpu().numpy()
        finally:
            bar.close()
            model.train(was_training)
        return np.concatenate(zs), out

    # ---- protocol hooks ------------------------------------------------------------------------------------
    def _fit(self, X: torch.Tensor) -> None:
        Z, R = self.latents_and_residuals(X)
        self.fit_residuals(Z, R)

    def fit_residuals(self, Z: np.ndarray, R: np.ndarray) -> None:
        """Fit the reference statistics from precomputed latents (N, d) and residuals (N, len(t_stars))."""
        R = np.asarray(R, dtype=np.float64)
        self.ref_residuals_ = R
        self.median_ = np.median(R, axis=0)
        q75, q25 = np.percentile(R, [75, 25], axis=0)
        self.iqr_ = np.maximum(q75 - q25, 1e-12 + 1e-9 * np.abs(self.median_))
        if self.context == "z":
            self.conditional_ = ConditionalResidual(n_residuals=R.shape[1], k=self.k)
            self.conditional_.fit(stack_latents_residuals(Z, R))
            self.reference_scores_ = self.conditional_.reference_scores_
        else:
            self.reference_scores_ = self._standardise(R)

    def _standardise(self, R: np.ndarray) -> np.ndarray:
        return ((R - self.median_) / self.iqr_).mean(axis=1)

    def score_residuals(self, Z: np.ndarray, R: np.ndarray) -> np.ndarray:
        """Scores from precomputed latents and residuals (same model, t*, steps and seeds as the fit)."""
        R = np.asarray(R, dtype=np.float64)
        if self.context == "z":
            return self.conditional_.score(stack_latents_residuals(Z, R))
        return self._standardise(R)

    def _score(self, X: torch.Tensor) -> np.ndarray:
        return self.score_residuals(*self.latents_and_residuals(X))

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters; the model is given by its class name."""
        params = super().get_params()
        return {"model": type(self.model).__name__, **params}
