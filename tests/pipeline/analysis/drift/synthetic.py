"""Synthetic latents for the drift tests: i.i.d. cells, lines of lots, two products."""

from __future__ import annotations

import numpy as np

D = 6
"""Latent axes of the synthetic references."""


def lot_latents(rng, n_lots, lot_size, lot_sd=0.7, shift=None):
    """Latents with strong lot structure: each lot has its own mean offset."""
    offsets = rng.normal(size=(n_lots, D)) * lot_sd
    Z = np.repeat(offsets, lot_size, axis=0) + rng.normal(size=(n_lots * lot_size, D))
    if shift is not None:
        Z = Z + shift
    return Z


def typed_line(rng, n_lots, lot_size, mono_every=3, run=1, shift=None):
    """Lots of two product types in production order, in runs of ``run`` lots of one type (a mono run, then
    ``mono_every - 1`` poly runs); the type moves axis 0 by 4 sd (like mono vs poly)."""
    Z, types, lots = [], [], []
    for i in range(n_lots):
        t = "mono" if (i // run) % mono_every == 0 else "poly"
        z = rng.normal(size=(lot_size, D)) + rng.normal(size=D) * 0.5
        z[:, 0] += 4.0 if t == "mono" else 0.0
        Z.append(z)
        types += [t] * lot_size
        lots += [i] * lot_size
    Z = np.vstack(Z)
    if shift is not None:
        Z = Z + shift
    return Z, np.array(types), np.array(lots)


def mixed_window(rng, n, mono_share, lot_size, shift=None):
    """A window of the usual mix: one run of consecutive mono cells and one of poly cells (new lots)."""
    k = int(round(n * mono_share))
    m, _, _ = typed_line(rng, -(-k // lot_size), lot_size, mono_every=1)
    p, _, _ = typed_line(rng, -(-(n - k) // lot_size) + 1, lot_size, mono_every=10**9)
    p = p[lot_size:]  # lot 0 of a "mono_every" line is mono: drop it
    Z = np.vstack([m[:k], p[: n - k]])
    return Z if shift is None else Z + shift


def iid_typed(rng, n, mono_share, shift=None):
    """i.i.d. cells of two products (mono moves axis 0 by 4 sd), no lots."""
    k = int(round(n * mono_share))
    Z = rng.normal(size=(n, D))
    Z[:k, 0] += 4.0
    return (Z if shift is None else Z + shift), np.array(["mono"] * k + ["poly"] * (n - k))
