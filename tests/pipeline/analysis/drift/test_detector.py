"""The drift detector: false alarms and power under the i.i.d. null, errors, window size, quality, product mix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.detectors import NotFittedError
from pipeline.analysis.drift import DriftDetector, even_subsample
from tests.pipeline.analysis.drift.synthetic import D, iid_typed, mixed_window, typed_line


def test_false_alarm_rate_under_iid_null():
    # the guarantee is over references and windows: 10 references of 600 images, 40 windows each. (With one fixed
    # reference the rate varies around alpha: e.g. a reference whose score 90th percentile happens to sit 3 standard
    # errors low makes the score family's tail share fire more often for that reference.)
    flags = []
    for r in range(10):
        rng = np.random.default_rng([10, r])
        det = DriftDetector(alpha=0.05, n_permutations=99, mmd_max_ref=200).fit(
            rng.normal(size=(600, D)), ref_scores=rng.normal(size=600))
        flags += [det.test(rng.normal(size=(50, D)), cur_scores=rng.normal(size=50)).detected for _ in range(40)]
    # nominal 0.05 with binomial sd 0.011 over 400 windows
    print(f"false-alarm rate {np.mean(flags):.3f}")
    assert np.mean(flags) <= 0.05 + 0.03


def test_power_on_one_axis_mean_shift(ref):
    det = DriftDetector(alpha=0.05, n_permutations=99, mmd_max_ref=200).fit(ref)
    rng = np.random.default_rng(11)
    results = []
    for _ in range(30):
        x = rng.normal(size=(100, D))
        x[:, 2] += 0.5
        results.append(det.test(x))
    assert np.mean([r.detected for r in results]) >= 0.9
    assert np.mean([r.top_axis == 2 for r in results]) >= 0.95
    r = next(r for r in results if r.detected)
    assert "axes" in r.fired and r.per_axis.iloc[0]["axis"] == 2 and r.per_axis.iloc[0]["significant"]
    assert r.per_axis.iloc[0]["effect_size"] > 0.2 and r.top_share > 0.3


def test_bonferroni_is_more_conservative_than_bh(ref):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(80, D)) + np.r_[0.35, 0.35, 0.35, 0, 0, 0]
    bh = DriftDetector(correction="bh", n_permutations=49).fit(ref).test(x)
    bf = DriftDetector(correction="bonferroni", n_permutations=49).fit(ref).test(x)
    assert (
        bh.per_axis.sort_values("axis")["p_adjusted"].to_numpy()
        <= bf.per_axis.sort_values("axis")["p_adjusted"].to_numpy() + 1e-15
    ).all()
    assert bh.per_axis["significant"].sum() >= bf.per_axis["significant"].sum()


def test_score_family_detects_score_drift(ref, ref_scores):
    det = DriftDetector(n_permutations=49).fit(ref, ref_scores=ref_scores)
    rng = np.random.default_rng(13)
    r = det.test(rng.normal(size=(60, D)), cur_scores=rng.normal(size=60) + 1.0)
    assert r.detected and "scores" in r.fired and r.score_stat > 0.7
    assert r.family_alpha == pytest.approx(0.05 / 3)


def test_errors(ref, ref_scores):
    with pytest.raises(NotFittedError):
        DriftDetector().test(ref[:50])
    det = DriftDetector(n_permutations=19).fit(ref, model_id="model-a")
    with pytest.raises(
        ValueError, match=r"window has 12 images; at least 30 are needed .*\(per day instead of per shift\)"
    ):
        det.test(ref[:12])
    with pytest.raises(ValueError, match=r"'model-a'.*'model-b'"):
        det.test(ref[:50], model_id="model-b")
    x = ref[:50].copy()
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.test(x)
    with pytest.raises(ValueError, match="latent axes"):
        det.test(np.zeros((50, D + 2)))
    with pytest.raises(ValueError, match="for both"):
        det.test(ref[:50], cur_scores=np.zeros(50))
    with pytest.raises(ValueError, match="reference has 40 images"):
        DriftDetector().fit(ref[:40])
    with pytest.raises(ValueError, match="ref_scores"):
        DriftDetector().fit(ref, ref_scores=np.zeros(10))
    with pytest.raises(ValueError, match="twice the window"):
        DriftDetector(null="lot", n_calibration=100).fit(ref).test(ref[:400])
    with pytest.raises(ValueError, match="n_calibration"):
        DriftDetector(null="lot", n_calibration=20)
    for kw in ({"alpha": 0}, {"correction": "holm"}, {"null": "block"}, {"min_window": 1}):
        with pytest.raises(ValueError):
            DriftDetector(**kw)


def test_even_subsample_and_max_window():
    assert even_subsample(10, 4).tolist() == [0, 3, 6, 9]
    assert even_subsample(5, 9).tolist() == [0, 1, 2, 3, 4]  # nothing to drop
    assert even_subsample(0, 3).size == 0
    with pytest.raises(ValueError, match="k >= 1"):
        even_subsample(10, 0)
    ref = np.random.default_rng(1).normal(size=(120, D))
    assert DriftDetector(null="lot", min_window=10).fit(ref).max_window == 40  # a third of the reference
    assert DriftDetector(null="lot", min_window=30).fit(ref[:70]).max_window == 30  # never below min_window
    assert DriftDetector().fit(ref).max_window is None  # the i.i.d. null has no guard band
    lot = DriftDetector(null="lot", min_window=10).fit(ref)
    assert lot.rows_to_test(100).tolist() == even_subsample(100, 40).tolist() and lot.rows_to_test(30).size == 30
    assert DriftDetector().fit(ref).rows_to_test(100).tolist() == list(range(100))
    with pytest.raises(NotFittedError):
        _ = DriftDetector(null="lot").max_window


@pytest.mark.parametrize("null", ["iid", "lot"])
def test_quality_family_sees_a_channel_the_latents_miss(null):
    rng = np.random.default_rng(42)
    ref = rng.normal(size=(600, D))
    q_ref = pd.DataFrame({"sharpness": rng.normal(1.0, 0.1, 600), "noise_level": rng.normal(0.01, 0.002, 600)})
    det = DriftDetector(null=null, n_permutations=49, n_calibration=200, mmd_max_ref=300).fit(ref, ref_quality=q_ref)
    q_ok = pd.DataFrame({"sharpness": rng.normal(1.0, 0.1, 80), "noise_level": rng.normal(0.01, 0.002, 80)})
    r0 = det.test(rng.normal(size=(80, D)), cur_quality=q_ok)
    assert set(r0.family_p) == {"axes", "mmd", "quality"} and r0.family_alpha == pytest.approx(0.05 / 3)
    assert r0.per_channel is not None and set(r0.per_channel["channel"]) == {"sharpness", "noise_level"}
    # blur: sharpness drops, the latents do not move
    q_blur = q_ok.assign(sharpness=q_ok["sharpness"] * 0.8)
    r1 = det.test(rng.normal(size=(80, D)), cur_quality=q_blur)
    assert r1.detected and "quality" in r1.fired and r1.top_channel == "sharpness"
    assert r1.per_channel.iloc[0]["effect_size"] < -1.0 and "sharpness" in r1.summary()
    # calibrated: unshifted windows rarely fire the quality family
    fired = [
        "quality" in det.test(rng.normal(size=(80, D)), cur_quality=pd.DataFrame({
            "sharpness": rng.normal(1.0, 0.1, 80), "noise_level": rng.normal(0.01, 0.002, 80)})).fired
        for _ in range(60)
    ]
    assert np.mean(fired) <= 0.05 / 3 + 0.06
    with pytest.raises(ValueError, match="or for neither"):
        det.test(rng.normal(size=(80, D)))
    with pytest.raises(ValueError, match="do not match"):
        det.test(rng.normal(size=(80, D)), cur_quality=q_ok[["noise_level", "sharpness"]])
    with pytest.raises(ValueError, match="NaN"):
        det.test(rng.normal(size=(80, D)), cur_quality=q_ok.assign(sharpness=np.nan))


@pytest.mark.parametrize("null", ["iid", "lot"])
def test_quality_family_is_not_moved_by_a_minority_of_failed_reads(null):
    """A few cells whose rotation reads fail (+-40 degrees) do not fire the family; every cell rotated does."""
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(600, D))
    q_ref = pd.DataFrame({"rotation_deg": rng.normal(0.0, 0.2, 600), "noise_level": rng.normal(0.01, 0.002, 600)})
    det = DriftDetector(null=null, n_permutations=49, n_calibration=200, mmd_max_ref=300).fit(ref, ref_quality=q_ref)

    def window(n_failed: int = 0, rotated: float = 0.0) -> pd.DataFrame:
        rot = rng.normal(0.0, 0.2, 100) + rotated
        rot[:n_failed] = rng.choice([-40.0, 40.0], n_failed)
        return pd.DataFrame({"rotation_deg": rot, "noise_level": rng.normal(0.01, 0.002, 100)})

    failed = [det.test(rng.normal(size=(100, D)), cur_quality=window(n_failed=8)) for _ in range(20)]
    assert np.mean(["quality" in r.fired for r in failed]) <= 0.1
    assert max(abs(r.per_channel.set_index("channel").loc["rotation_deg", "effect_size"]) for r in failed) < 1.0
    rotated = det.test(rng.normal(size=(100, D)), cur_quality=window(rotated=0.6))
    assert "quality" in rotated.fired and rotated.top_channel == "rotation_deg"
    assert rotated.per_channel.iloc[0]["effect_size"] == pytest.approx(3.0, abs=0.8)


@pytest.mark.parametrize("null", ["iid", "lot"])
def test_quality_floor_keeps_a_small_move_quiet_and_a_large_one_significant(null):
    """A noise-level move far outside a tight reference but under its floor is not reported; one over it is."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(600, D))
    q_ref = pd.DataFrame({"noise_level": rng.normal(0.0045, 0.0003, 600), "detail_ratio": rng.normal(1.3, 0.1, 600)})

    def window(noise: float) -> pd.DataFrame:
        return pd.DataFrame({"noise_level": rng.normal(noise, 0.0003, 100), "detail_ratio": rng.normal(1.3, 0.1, 100)})

    plain = DriftDetector(null=null, n_permutations=49, n_calibration=200, mmd_max_ref=300).fit(ref, ref_quality=q_ref)
    floored = DriftDetector(null=null, n_permutations=49, n_calibration=200, mmd_max_ref=300,
                            quality_floors={"noise_level": 0.002}).fit(ref, ref_quality=q_ref)
    Z = rng.normal(size=(100, D))
    small, large = window(0.0053), window(0.0300)  # +0.0008 (about 2.7 reference sd) and +0.0255
    assert "quality" in plain.test(Z, cur_quality=small).fired
    quiet = floored.test(Z, cur_quality=small)
    assert "quality" not in quiet.fired and quiet.family_p["quality"] > quiet.family_alpha
    row = quiet.per_channel.set_index("channel").loc["noise_level"]
    assert not row["reportable"] and not row["significant"] and row["effect_size"] > 2.0  # the move is still shown
    loud = floored.test(Z, cur_quality=large)
    assert "quality" in loud.fired and loud.top_channel == "noise_level"
    assert loud.per_channel.set_index("channel").loc["noise_level", "reportable"]
    # a channel without a floor is judged as before
    blur = floored.test(Z, cur_quality=window(0.0045).assign(detail_ratio=lambda q: q["detail_ratio"] + 0.3))
    assert "quality" in blur.fired and blur.top_channel == "detail_ratio"


@pytest.mark.parametrize("null", ["iid", "lot"])
def test_a_one_sided_channel_reports_only_its_direction(null):
    """Fine detail watched for a rise (defocus, noise): a healthy lot's fall is shown but not reported; a rise is."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(600, D))
    q_ref = pd.DataFrame({"detail_ratio": rng.normal(1.3, 0.1, 600), "rotation_deg": rng.normal(0.0, 0.2, 600)})
    kw = dict(null=null, n_permutations=49, n_calibration=200, mmd_max_ref=300)
    plain = DriftDetector(**kw).fit(ref, ref_quality=q_ref)
    watched = DriftDetector(**kw, quality_directions={"detail_ratio": 1}).fit(ref, ref_quality=q_ref)
    Z = rng.normal(size=(100, D))

    def window(detail: float, rotation: float = 0.0) -> pd.DataFrame:
        return pd.DataFrame({"detail_ratio": rng.normal(detail, 0.1, 100), "rotation_deg": rng.normal(rotation, 0.2, 100)})

    fall, rise = window(1.0), window(1.6)
    assert "quality" in plain.test(Z, cur_quality=fall).fired
    quiet = watched.test(Z, cur_quality=fall)
    row = quiet.per_channel.set_index("channel").loc["detail_ratio"]
    assert "quality" not in quiet.fired and not row["reportable"] and row["effect_size"] < -2.0
    loud = watched.test(Z, cur_quality=rise)
    assert "quality" in loud.fired and loud.top_channel == "detail_ratio"
    turned = watched.test(Z, cur_quality=window(1.3, rotation=-0.8))  # an unnamed channel: both ways
    assert "quality" in turned.fired and turned.top_channel == "rotation_deg"
    with pytest.raises(ValueError, match="quality_directions"):
        DriftDetector(quality_directions={"detail_ratio": 2})


def test_quality_floors_are_checked():
    with pytest.raises(ValueError, match="quality_floors"):
        DriftDetector(quality_floors={"noise_level": -1.0})
    with pytest.raises(ValueError, match="quality_floors"):
        DriftDetector(quality_floors={"noise_level": float("nan")})
    assert DriftDetector(quality_floors={"noise_level": 2e-3}).get_params()["quality_floors"] == {"noise_level": 0.002}


@pytest.mark.parametrize("null", ["lot", "iid"])
def test_conditioning_on_the_product_makes_a_mix_swing_no_drift(null):
    """A window of another product mix, nothing else changed: drift without conditioning, none with it."""
    rng = np.random.default_rng(42)
    if null == "lot":
        ref, types, lots = typed_line(rng, 36, 30, run=4)  # a third mono

        def window(share, shift=None):
            k = int(round(90 * share))
            return mixed_window(rng, 90, share, 30, shift=shift), np.array(["mono"] * k + ["poly"] * (90 - k))
    else:
        ref, types = iid_typed(rng, 1080, 1 / 3)
        lots = None

        def window(share, shift=None):
            return iid_typed(rng, 90, share, shift)
    det = DriftDetector(null=null, n_calibration=200, mmd_max_ref=300, alpha=0.05).fit(
        ref, ref_strata=types, ref_lots=lots)
    plain, conditioned = [], []
    for i in range(16):
        share = (0.9, 0.1)[i % 2]  # mostly mono one day, mostly poly the next
        z, labels = window(share)
        plain.append(det.test(z).detected)
        res = det.test(z, cur_strata=labels)
        conditioned.append(res.detected)
        assert res.mix.window["mono"] == pytest.approx(np.mean(labels == "mono"))
        assert res.mix.conditioned and not res.mix.explains
    assert np.mean(plain[::2]) >= 0.9  # the unconditioned test calls a 90 % mono day (reference: a third) drift
    assert np.mean(conditioned) <= 0.15
    # a real shift within both products is still found in an extreme-mix window, on the right axis
    found = []
    for _ in range(8):
        z, labels = window(0.9, shift=np.r_[0, 0, 1.5, 0, 0, 0])
        res = det.test(z, cur_strata=labels)
        found.append(res.detected and res.top_axis == 2)
    assert np.mean(found) >= 0.75


def test_cells_of_a_product_the_reference_lacks_are_not_tested_and_the_mix_says_so():
    rng = np.random.default_rng(43)
    ref, types, lots = typed_line(rng, 24, 30, run=4)
    det = DriftDetector(null="lot", n_calibration=200, mmd_max_ref=300).fit(ref, ref_strata=types, ref_lots=lots)
    from pipeline.analysis.axes import attribute, mix_note

    new = rng.normal(size=(60, D)) + np.r_[0, 6.0, 0, 0, 0, 0]  # a new product: far from both known ones
    res = det.test(new, cur_strata=np.array(["hjt"] * 60))
    assert not res.detected and res.fired == () and res.n_cur == 0 and res.n_untested == 60  # not comparable
    assert res.mix.explains and res.mix.unsupported == {"hjt": 1.0}
    assert "hjt" in mix_note(res) and "not tested" in attribute(res).text
    # a share of new-product cells: the known ones are tested, the others left out and named
    known = mixed_window(rng, 90, 0.33, 30)
    res2 = det.test(np.vstack([known, new[:30]]), cur_strata=np.array(["mono"] * 30 + ["poly"] * 60 + ["hjt"] * 30))
    assert res2.n_cur == 90 and res2.n_untested == 30 and not res2.detected
    assert res2.mix.unsupported == {"hjt": 0.25} and "hjt (25% of the window)" in mix_note(res2)
    # without the reference's products there is nothing to say about the mix
    plain = DriftDetector(null="lot", n_calibration=200, mmd_max_ref=300).fit(ref)
    assert plain.test(mixed_window(rng, 90, 0.4, 30), cur_strata=np.array(["mono"] * 36 + ["poly"] * 54)).mix is None
