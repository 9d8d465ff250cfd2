"""Per-window drift tests of latents against a reference, with an i.i.d. null and a lot-aware null.

A *window* is a batch of images (a count of consecutive images, a shift, a day; see :func:`windows`). Its latents z
are compared with the reference latents (a calibration split of normal images encoded by the same model) by three
families of tests:

* **per axis**: two-sample Kolmogorov-Smirnov on every latent axis, corrected for multiplicity with
  Benjamini-Hochberg (default) or Bonferroni. Reported with the signed effect size in reference standard deviations
  and the population stability index (PSI, with the conventional bands) of each axis;
* **multivariate**: the unbiased MMD^2 with a Gaussian RBF kernel (median-heuristic bandwidth) and a permutation test;
* **anomaly scores** (when given): "are there more unusual cells?", two one-sided statistics combined by their
  smaller p-value (Bonferroni under the i.i.d. null, the joint bootstrap under the lot null): the AUC
  ``P(score_cur > score_ref)`` (Mann-Whitney), which sees a shift of the whole score distribution, and the *tail
  share*, the share of window cells above the reference's ``1 - score_tail`` quantile (Fisher's exact test), which
  sees a minority of cells turning bad. The tail share is what a quality engineer reads ("23 % of today's cells score
  above the reference's 90th percentile, 10 % expected"). Under the lot null, where a whole lot scoring a little
  higher is normal, it finds a minority of bad cells far more often than the AUC (synthetic lots:
  ``tests/pipeline/analysis/drift/test_lotnull.py``; ELPV lot windows: ``benchmarks/results/bench_drift_faults.md``); the AUC
  is the stronger one for a shift of every cell and on i.i.d. windows;
* **image quality** (when given): per-channel median shift (in robust reference sd, 1.4826 MAD, so that a minority
  of cells on which a measurement fails cannot move it; Mann-Whitney under the i.i.d. null) of
  full-resolution image-quality measurements (fine detail, noise level, rotation from :mod:`pipeline.latent.properties`),
  Bonferroni over channels. A level shift, not KS: the faults these channels watch move a property's level, while
  whole lots differ in the *shape* of e.g. the rotation distribution (all cells of one module share it), which KS
  would count as drift. A latent computed at
  32-64 px cannot see a 1 px blur or 3 % sensor noise on a 300 px image (downsampling averages them away); these
  channels can, and the result names the channel that moved.

**Combination rule.** With k families present (2 to 4), each family is tested at ``alpha / k`` and the window is
flagged when any family fires (Bonferroni across families), so the false-alarm rate on unshifted windows is at most
``alpha`` under the null in force. The per-axis family's p-value is the smallest corrected p-value: with BH this is
Simes' global test (valid for independent or positively dependent axes), with Bonferroni it is valid under any
dependence.

**Nulls.** ``null="iid"`` assumes the window is an i.i.d. sample of the reference distribution: p-values come from the
KS distribution, the MMD permutations and Mann-Whitney. Images on a line are not i.i.d.: cells of one lot (a module)
resemble each other, so a window of consecutive images differs from the reference by lot-to-lot variation that
every i.i.d. two-sample test flags. ``null="lot"`` calibrates instead on windows of *consecutive reference images*
(a moving-block bootstrap over the reference in its original order): for the window size n it draws
``n_calibration`` windows made of contiguous blocks (of ``lot_block`` images; default one block of n), computes the
family statistics (max KS over axes, MMD^2 with the reference bandwidth, score AUC and tail share, max quality
shift) of each against the rest of the
reference (leave-window-out, with a guard band of one block on each side, or the whole lots the window touches when
``ref_lots`` is given, so a window is never compared with the other half of its own lot), and takes empirical
p-values ``(1 + #{boot >= obs}) / (B + 1)``. A window is then compared with how much whole lots normally differ.
With ``ref_strata`` (e.g. the product type) each calibration window takes every stratum's share of the reference as
consecutive images of that stratum and is compared with the rest re-weighted to the reference's shares, so a
calibration window looks like a monitored window of the usual product mix, not like one product's run.
Calibrations are cached per window size. The lot null is only as precise as the reference holds independent
windows (about n_ref / n): calibrated on average, but the false-alarm rate one line sees with its one reference
varies around alpha (see ``benchmarks/results/bench_drift_calibration.md``).

Modules:

* :mod:`~pipeline.analysis.drift.statistics`: the pure two-sample statistics (:func:`ks_per_axis`, :func:`bh_adjust`,
  :func:`bonferroni`, :func:`effect_size`, :func:`psi`, :func:`psi_band`, :func:`mmd_permutation_test`,
  :func:`score_distribution_test`, :func:`score_tail_test`, ...);
* :mod:`~pipeline.analysis.drift.lotnull`: the lot-null calibration (:class:`~pipeline.analysis.drift.lotnull.LotNull`);
* :mod:`~pipeline.analysis.drift.result`: :class:`DriftResult`;
* :mod:`~pipeline.analysis.drift.detector`: :class:`DriftDetector`, which follows the detector shape
  (``fit(reference)``, then ``test(window)`` -> :class:`DriftResult`);
* windows themselves are cut by :mod:`pipeline.analysis.windows` (:func:`windows`, re-exported here).
"""

from __future__ import annotations

from pipeline.analysis.drift.detector import DriftDetector, even_subsample
from pipeline.analysis.drift.result import DriftResult
from pipeline.analysis.drift.statistics import (  # noqa: F401 - the private helpers keep their old import path
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    _auc,
    _max_weighted_ks,
    _weighted_auc,
    _weighted_mmd2,
    bh_adjust,
    bonferroni,
    effect_size,
    ks_per_axis,
    median_heuristic,
    mmd2_unbiased,
    mmd_permutation_test,
    psi,
    psi_band,
    score_distribution_test,
    score_tail_test,
)
from pipeline.analysis.windows import DEFAULT_SHIFTS, Window, windows  # noqa: F401 - re-exported

__all__ = [
    "DriftDetector",
    "DriftResult",
    "Window",
    "bh_adjust",
    "bonferroni",
    "effect_size",
    "even_subsample",
    "ks_per_axis",
    "median_heuristic",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "psi",
    "psi_band",
    "score_distribution_test",
    "score_tail_test",
    "windows",
]
