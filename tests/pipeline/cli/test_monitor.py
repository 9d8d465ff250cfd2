from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main


@pytest.fixture(scope="module")
def ref_parquet(tiny_checkpoint, tmp_path_factory, elpv_small, png_writer):
    folder = tmp_path_factory.mktemp("ref_images")
    png_writer(elpv_small.images, folder)
    out = folder.parent / "ref_latents.parquet"
    assert main(["encode", "--model", str(tiny_checkpoint), "--images", str(folder), "--out", str(out),
                 "--no-progress"]) == 0
    return folder, out


@pytest.mark.parametrize("command", ["score", "drift"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--reference" in out


def _score_json(capsys, *args):
    capsys.readouterr()
    assert main(["score", *args, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_score_flags_an_odd_image(tiny_checkpoint, ref_parquet, elpv_small, tmp_path, capsys, png_writer):
    ref_dir, ref_pq = ref_parquet
    imgs = tmp_path / "today"
    normal = elpv_small.images[:3]
    odd = np.zeros((1, 300, 300), np.uint8)  # a black frame: camera off
    png_writer(np.concatenate([normal, odd]), imgs)
    doc = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference", str(ref_dir),
                      "--fpr", "0.1")
    assert doc["n_images"] == 4 and len(doc["images"]) == 4
    assert doc["n_reference_fit"] + doc["n_reference_threshold"] == len(elpv_small.images)
    scores = [r["score"] for r in doc["images"]]
    assert int(np.argmax(scores)) == 3
    assert doc["images"][3]["flagged"] is True
    assert all(0 < r["p_value"] <= 1 for r in doc["images"])
    assert len(doc["images"][0]["sha256"]) == 64
    assert doc["detector"] == "patch"  # auto: image folders give the monitor's default score, the patch maps
    # fused with the residual family (--residual-weight 1 in the monitor): the black frame first too
    doc_fused = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference",
                            str(ref_dir), "--fpr", "0.1", "--detector", "fused")
    assert doc_fused["detector"] == "fused" and int(np.argmax([r["score"] for r in doc_fused["images"]])) == 3
    # the residual family alone ranks the black frame first too
    doc_res = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference",
                          str(ref_dir), "--fpr", "0.1", "--detector", "residual")
    assert doc_res["detector"] == "residual" and int(np.argmax([r["score"] for r in doc_res["images"]])) == 3
    assert [r["score"] for r in doc_res["images"]] != scores

    # a latents Parquet reference (no residual columns): auto takes Mahalanobis on z, the same as from the folder
    doc_pq = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference",
                         str(ref_pq), "--fpr", "0.1")
    doc_maha = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference",
                           str(ref_dir), "--fpr", "0.1", "--detector", "mahalanobis")
    assert doc_pq["detector"] == doc_maha["detector"] == "mahalanobis"
    np.testing.assert_allclose([r["score"] for r in doc_pq["images"]], [r["score"] for r in doc_maha["images"]],
                               rtol=1e-6)
    assert int(np.argmax([r["score"] for r in doc_maha["images"]])) == 3

    # table output
    assert main(["score", "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference", str(ref_pq),
                 "--fpr", "0.1", "--detector", "knn"]) == 0
    text = capsys.readouterr().out
    assert "ANOMALY" in text and "flagged" in text and "cell_0003.png" in text


def test_score_user_errors(tiny_checkpoint, ref_parquet, tmp_path, capsys):
    ref_dir, ref_pq = ref_parquet
    other = tmp_path / "other.parquet"
    pd.read_parquet(ref_pq).assign(model_id="another-model").to_parquet(other)
    base = ["score", "--model", str(tiny_checkpoint), "--images", str(ref_dir), "--no-progress"]
    cases = [
        ([], "--reference is required"),
        (["--reference", str(other)], "holds no latents of model"),
        (["--reference", str(tmp_path / "missing")], "does not exist"),
        (["--reference", str(ref_pq), "--fpr", "0.01"], "calibration"),  # 12 threshold images < 99
        (["--reference", str(ref_pq), "--fpr", "2"], "--fpr"),
        (["--reference", str(ref_pq), "--detector", "residual"], "has no residual columns"),
        (["--reference", str(ref_pq), "--detector", "fused"], "the fused detector needs image folders"),
        (["--reference", str(ref_pq), "--detector", "patch"], "the patch detector needs image folders"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (extra, err)


def _drift_json(capsys, *args):
    capsys.readouterr()
    assert main(["drift", *args, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_drift_same_vs_shifted(tiny_checkpoint, ref_parquet, elpv_small, tmp_path, capsys, png_writer):
    ref_dir, ref_pq = ref_parquet
    common = ["--model", str(tiny_checkpoint), "--reference", str(ref_pq), "--min-window", "10"]
    same = _drift_json(capsys, *common, "--current", str(ref_dir))
    assert same["detected"] is False
    assert same["multivariate"]["p_value"] > 0.05
    d = len(same["axes"])
    assert d == json.loads((tiny_checkpoint / "config.json").read_text())["model"]["latent_dim"]
    assert sorted(a["rank"] for a in same["axes"]) == list(range(1, d + 1))
    for key in ("statistic", "p_value", "effect_size", "psi", "rank"):
        assert key in same["axes"][0]

    dark = tmp_path / "dark"
    png_writer((elpv_small.images * 0.35).astype(np.uint8), dark)  # the camera gain dropped
    shifted = _drift_json(capsys, *common, "--current", str(dark))
    assert shifted["detected"] is True
    assert shifted["multivariate"]["statistic"] > same["multivariate"]["statistic"]
    assert shifted["axes"][0]["rank"] == 1 and abs(shifted["axes"][0]["effect_size"]) > 1.0

    # table output names the verdict and every axis
    assert main(["drift", *common, "--current", str(dark), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "detected: True" in text and "MMD^2" in text and text.count("z_") >= d


def test_drift_lot_null_and_errors(tiny_checkpoint, ref_parquet, elpv_small, tmp_path, capsys, png_writer):
    ref_dir, ref_pq = ref_parquet
    window = tmp_path / "window"
    png_writer(elpv_small.images[:10], window)
    doc = _drift_json(capsys, "--model", str(tiny_checkpoint), "--reference", str(ref_dir), "--current",
                      str(window), "--null", "lot", "--min-window", "5")
    assert doc["null"] == "lot" and isinstance(doc["detected"], bool)
    # a window larger than a third of the reference is subsampled evenly for the lot null's guard band, and says so
    n_ref = len(elpv_small.images)
    assert doc["n_current_given"] == 10 and doc["n_current"] == min(10, max(n_ref // 3, 5))
    big = _drift_json(capsys, "--model", str(tiny_checkpoint), "--reference", str(ref_dir), "--current",
                      str(ref_dir), "--null", "lot", "--min-window", "5")
    assert big["n_current_given"] == n_ref and big["n_current"] == max(n_ref // 3, 5)
    assert main(["drift", "--model", str(tiny_checkpoint), "--reference", str(ref_dir), "--current", str(ref_dir),
                 "--null", "lot", "--min-window", "5", "--no-progress"]) == 0
    assert f"subsampled evenly from {n_ref} to {big['n_current']} images" in capsys.readouterr().out

    base = ["drift", "--model", str(tiny_checkpoint), "--no-progress"]
    cases = [
        (["--current", str(window)], "--reference is required"),
        (["--reference", str(ref_pq), "--current", str(window), "--min-window", "12"], "window has 10 images"),
        (["--reference", str(ref_pq), "--current", str(window)], "at least 60"),  # default min window 30
        (["--reference", str(ref_pq), "--current", str(tmp_path / "nothing")], "does not exist"),
        (["--reference", str(ref_pq), "--current", str(window), "--alpha", "1.5"], "alpha"),
    ]
    for extra, msg in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err, (extra, err)


def test_drift_quality_channels_see_a_blur_the_tiny_latent_cannot(
    tiny_checkpoint, ref_parquet, elpv_small, tmp_path, capsys, png_writer
):
    from scipy import ndimage

    ref_dir, ref_pq = ref_parquet
    blurred = tmp_path / "blurred"
    imgs = ndimage.gaussian_filter(elpv_small.images.astype(np.float32), sigma=(0, 1.0, 1.0))
    png_writer(np.clip(np.rint(imgs), 0, 255).astype(np.uint8), blurred)  # 1 px defocus at 300 px
    common = ["--model", str(tiny_checkpoint), "--reference", str(ref_dir), "--min-window", "10", "--quality"]
    doc = _drift_json(capsys, *common, "--current", str(blurred))
    assert doc["detected"] is True and "quality" in doc["fired"]
    chans = {c["channel"]: c for c in doc["quality"]["channels"]}
    assert set(chans) == {"detail_ratio", "noise_level", "rotation_deg", "illumination"}
    assert chans["detail_ratio"]["significant"] and chans["detail_ratio"]["effect_size"] > 1.0
    same = _drift_json(capsys, *common, "--current", str(ref_dir))
    assert "quality" not in same["fired"]
    assert main(["drift", *common, "--current", str(blurred), "--no-progress"]) == 0
    assert "image quality (full resolution)" in capsys.readouterr().out
    # the channels are measured on images: a latents file cannot give them
    assert main(["drift", "--model", str(tiny_checkpoint), "--reference", str(ref_pq), "--current", str(blurred),
                 "--quality", "--min-window", "10", "--no-progress"]) == 2
    assert "--quality measures the images" in capsys.readouterr().err


def test_score_names_catalogued_images_by_their_mes_serial(tmp_path, monkeypatch, png_writer, elpv_small):
    """``linewatch score`` on the store (hash-named files) or on copies says the serial a person finds on the line."""
    from pipeline.catalog.ingest import ingest
    from pipeline.catalog.tables import read_catalog, resolve_store_path
    from pipeline.cli.monitor import catalog_serials
    from pipeline.common.images import sha256_file

    drop = tmp_path / "drop" / "L1" / "2026-01-05"
    paths = png_writer(elpv_small.images[:2], drop, prefix="SN")
    monkeypatch.setenv("LINEWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LINEWATCH_CATALOG", raising=False)
    ingest(tmp_path / "drop", tmp_path / "home", progress=False)
    stored = [resolve_store_path(tmp_path / "home", p) for p in read_catalog(tmp_path / "home")["store_path"]]
    other = png_writer(elpv_small.images[5:6], tmp_path / "elsewhere")[0]
    frame = pd.DataFrame({"sha256": [sha256_file(p) for p in [*stored, other]]})
    assert sorted(catalog_serials(frame)[:2]) == sorted(p.stem for p in paths) and catalog_serials(frame)[2] == ""
    assert catalog_serials(pd.DataFrame({"path": ["x"]})) == [""]


# ------------------------------------------------------------------------------------------------ issue 14


@pytest.fixture(scope="module")
def fresh_checkpoint(tmp_path_factory):
    """An untrained tiny checkpoint (cheap): only its files matter here."""
    import torch

    from models import InfoDiffusion, get_preset, save_checkpoint

    p = get_preset("tiny")
    torch.manual_seed(0)
    return save_checkpoint(InfoDiffusion(p.model), tmp_path_factory.mktemp("fresh") / "ckpt", preprocess=p.preprocess)


def _one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"linewatch {command}: error:"), err
    return lines[0]


@pytest.mark.parametrize("case", ["flipped", "truncated", "wrong_type"])
@pytest.mark.parametrize("command", ["score", "drift"])
def test_11_broken_checkpoint_one_line_exit_2(fresh_checkpoint, image_dir, tmp_path, capsys, case, command):
    from tests.pipeline.catalog import hostile as H

    ckpt = H.copy_checkpoint(fresh_checkpoint, tmp_path / "broken")
    {"flipped": H.corrupt_safetensors, "truncated": H.truncated_safetensors,
     "wrong_type": lambda c: H.wrong_type_config(c, "latent_dim", "eight")}[case](ckpt)
    where = "--images" if command == "score" else "--current"
    assert main([command, "--model", str(ckpt), "--reference", str(image_dir), where, str(image_dir),
                 "--no-progress"]) == 2
    assert "broken" in _one_error_line(capsys, command)  # the checkpoint is named, not a later symptom


@pytest.mark.parametrize("command", ["score", "drift"])
def test_11_decompression_bomb_image_one_line_exit_2(fresh_checkpoint, image_dir, tmp_path, capsys, command):
    import shutil

    from tests.pipeline.catalog import hostile as H

    bombs = tmp_path / "bombs"
    shutil.copytree(image_dir, bombs)
    H.write(bombs / "zz_bomb.png", H.bomb_png())
    where = "--images" if command == "score" else "--current"
    assert main([command, "--model", str(fresh_checkpoint), "--reference", str(image_dir), where, str(bombs),
                 "--no-progress", "--min-window", "10"][: None if command == "drift" else -2]) == 2
    assert "zz_bomb.png" in _one_error_line(capsys, command)


def test_14_too_small_reference_message_speaks_of_reference_images(fresh_checkpoint, image_dir, tmp_path, capsys,
                                                                     elpv_small, png_writer):
    few = tmp_path / "few"
    png_writer(elpv_small.images[:6], few)
    assert main(["score", "--model", str(fresh_checkpoint), "--images", str(few), "--reference", str(few),
                 "--no-progress"]) == 2
    line = _one_error_line(capsys, "score")
    assert "ConditionalResidual" not in line and "6 reference images" in line and "at least" in line


def _block_stats_module():
    """A stand-in for ``pipeline.latent.features``: the patch map is each 8x8 block's mean and spread of the cell."""
    import types

    from pipeline.common.images import read_image  # noqa: F401  (same decoding as the command)

    class FS:
        def __init__(self, patches):
            self.patches = patches

    def compute_features(images):
        out = []
        for im in images:
            a = np.asarray(im, np.float32).reshape(im.shape[0], im.shape[1])
            h, w = a.shape[0] // 8 * 8, a.shape[1] // 8 * 8
            b = a[:h, :w].reshape(8, h // 8, 8, w // 8)
            out.append(np.stack([b.mean(axis=(1, 3)), b.std(axis=(1, 3))]))
        return FS(np.stack(out))

    mod = types.ModuleType("pipeline.latent.features")
    mod.compute_features = compute_features
    return mod


def test_score_writes_heatmaps_of_flagged_images(tiny_checkpoint, ref_parquet, elpv_small, tmp_path, capsys,
                                                 png_writer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pipeline.latent.features", _block_stats_module())
    ref_dir, ref_pq = ref_parquet
    imgs = tmp_path / "today"
    odd = elpv_small.images[:1].copy()
    odd[0, :150, :] = 0  # the top half of the cell dark
    png_writer(np.concatenate([elpv_small.images[1:3], odd]), imgs)
    hm = tmp_path / "heatmaps"
    doc = _score_json(capsys, "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference", str(ref_dir),
                      "--fpr", "0.1", "--heatmaps", str(hm), "--heatmap-top", "2")
    flagged = [r for r in doc["images"] if r["flagged"]]
    assert doc["images"][2]["flagged"]
    assert len(doc["heatmaps"]) == min(2, len(flagged))
    assert all(p.endswith(".png") and (hm / p.split("/")[-1]).exists() for p in doc["heatmaps"])
    # a reference without image paths cannot give patch maps: one-line error, non-zero exit
    bare = tmp_path / "bare.parquet"
    pd.read_parquet(ref_pq).drop(columns=["path"], errors="ignore").to_parquet(bare)
    assert main(["score", "--model", str(tiny_checkpoint), "--images", str(imgs), "--reference", str(bare),
                 "--fpr", "0.1", "--heatmaps", str(hm), "--no-progress"]) != 0
