"""Which latent axis moved, and what it means: attribution, axis descriptions and cards, alignment across models.

* :func:`attribute` turns a drift test result (:class:`pipeline.analysis.drift.DriftResult`, duck-typed) into an
  :class:`Attribution`: the significant axes ranked by |effect| (shift of the mean in reference standard
  deviations), the share of the total |effect| carried by the top axis, and one line of text such as
  ``"axis 3 (brightness, r = 0.94) moved by -1.8 σ; 71% of the drift"``.
* :func:`axis_correlations` / :func:`describe_axes` correlate every latent axis with the measurable image properties
  of :mod:`pipeline.latent.properties` on the reference set and name each axis after its best property
  (``"axis 3: brightness (r = 0.94)"``).
* :func:`axis_cards` renders, for each axis, a traversal strip (a few reference images decoded with that axis set to
  its reference quantiles) as ``axis_XX.png`` + ``axis_XX.json``, and an overview ``axes.json``.
* :func:`align_axes` / :func:`apply_alignment` keep axis numbers comparable across retrained models: the latents of
  one fixed probe set under both models are matched by the Hungarian algorithm on |correlation| (a permutation and a
  sign per axis), and the quality of the match is reported.

Modules: :mod:`~pipeline.analysis.axes.describe` (descriptions), :mod:`~pipeline.analysis.axes.attribution`
(attribution and its texts), :mod:`~pipeline.analysis.axes.cards` (axis cards), :mod:`~pipeline.analysis.axes.align`
(alignment); every public name is re-exported here.
"""

from __future__ import annotations

from pipeline.analysis.axes.align import Alignment, align_axes, apply_alignment
from pipeline.analysis.axes.attribution import (  # noqa: F401 - MIX_CHANGE re-exported
    LATENT_FAMILIES,
    MIX_CHANGE,
    AttributedAxis,
    Attribution,
    DriftLike,
    attribute,
    channel_phrase,
    image_level_text,
    mix_note,
    mix_text,
    quality_text,
    scores_text,
)
from pipeline.analysis.axes.cards import CARD_FILE_MODE, AxisCard, axis_cards  # noqa: F401 - re-exported
from pipeline.analysis.axes.describe import (  # noqa: F401 - MIN_ABS_R re-exported
    MIN_ABS_R,
    AxisDescription,
    axis_correlations,
    describe_axes,
)

__all__ = [
    "Alignment",
    "AttributedAxis",
    "Attribution",
    "AxisCard",
    "AxisDescription",
    "DriftLike",
    "LATENT_FAMILIES",
    "align_axes",
    "apply_alignment",
    "attribute",
    "axis_cards",
    "axis_correlations",
    "channel_phrase",
    "describe_axes",
    "image_level_text",
    "mix_note",
    "mix_text",
    "quality_text",
    "scores_text",
]
