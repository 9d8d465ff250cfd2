"""Stand-ins for the axes tests: a drift result, its per-axis table, latents built from known properties."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class FakeDrift:
    detected: bool
    per_axis: pd.DataFrame
    fired: tuple[str, ...] = ("axes",)
    meta: dict = field(default_factory=dict)


def drift_table(effects: list[float], significant: list[bool]) -> pd.DataFrame:
    d = len(effects)
    return pd.DataFrame(
        {
            "axis": np.arange(d),
            "ks_stat": np.abs(effects) / 4,
            "p_value": np.where(significant, 1e-8, 0.5),
            "p_adjusted": np.where(significant, 1e-7, 0.9),
            "effect_size": effects,
            "psi": np.abs(effects) / 10,
            "psi_band": "stable",
            "significant": significant,
            "rank": np.arange(d),
        }
    )


def synthetic_latents(n: int = 400, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Latents built from known properties: axis 0 <- brightness, axis 1 <- -sharpness, axis 2 <- noise only."""
    rng = np.random.default_rng(seed)
    props = pd.DataFrame(
        {
            "mean_intensity": rng.uniform(0.3, 0.7, n),
            "sharpness": rng.gamma(2.0, 1.0, n),
            "rotation_deg": rng.normal(0, 1, n),
        }
    )
    Z = np.column_stack(
        [
            (props["mean_intensity"] - 0.5) * 10 + 0.1 * rng.standard_normal(n),
            -np.log(props["sharpness"]) + 0.2 * rng.standard_normal(n),
            rng.standard_normal(n),
        ]
    )
    return Z, props
