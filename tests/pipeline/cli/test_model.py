from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.common.schemas import latent_matrix
from tests.pipeline.catalog import hostile as H

COMMANDS = ["train", "encode", "traverse", "reconstruct", "sample"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"linewatch {command}" in out


def test_train_end_to_end_with_overrides(image_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc = main(
        ["train", "--images", str(image_dir), "--out", str(out), "--preset", "tiny", "--steps", "3",
         "--batch-size", "4", "--lambda", "0", "--zeta", "0", "--latent-dim", "4", "--seed", "1", "--no-progress",
         "--device", "cpu"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for key in ("steps:", "final loss:", "images/s:", "model id:", "checkpoint:"):
        assert key in text
    from models import load_checkpoint

    ckpt = load_checkpoint(out)
    assert ckpt.config.latent_dim == 4
    assert ckpt.config.loss.lambda_mmd == 0 and ckpt.config.loss.zeta == 0
    assert not ckpt.config.encoder.stochastic
    assert ckpt.meta["model_id"] in text

    # --resume continues the same run; --init starts a new one from those weights
    # an existing run is never overwritten without --resume
    assert main(["train", "--images", str(image_dir), "--out", str(out), "--preset", "tiny", "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--images", str(image_dir), "--out", str(out), "--preset", "tiny", "--steps", "5",
                 "--batch-size", "4", "--latent-dim", "4", "--lambda", "0", "--zeta", "0", "--resume",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "steps:        5" in capsys.readouterr().out
    out2 = tmp_path / "ckpt2"
    assert main(["train", "--images", str(image_dir), "--out", str(out2), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--latent-dim", "4", "--lambda", "0", "--zeta", "0", "--init", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    assert load_checkpoint(out2).config.latent_dim == 4


def test_train_user_errors(tmp_path, image_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--images", str(tmp_path / "missing")], "does not exist"),
        (["--images", str(empty)], "no images"),
        (["--images", str(image_dir), "--preset", "huge"], "unknown preset"),
        (["--images", str(image_dir), "--init", str(tmp_path / "nockpt")], "--init"),
        (["--images", str(image_dir), "--latent-dim", "0"], "latent_dim"),
    ]
    for extra, msg in cases:
        rc = main(["train", "--out", str(tmp_path / "o"), "--steps", "1", "--preset", "tiny", *extra])
        assert rc == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (extra, err)


def test_encode_command(tiny_checkpoint, image_dir, tmp_path, elpv_small, capsys):
    out = tmp_path / "z.parquet"
    assert main(["encode", "--model", str(tiny_checkpoint), "--images", str(image_dir), "--out", str(out),
                 "--batch-size", "10", "--no-progress"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == len(elpv_small.images)
    assert list(df.columns[:3]) == ["path", "sha256", "model_id"]
    assert latent_matrix(df).shape[1] == json.loads((tiny_checkpoint / "config.json").read_text())["model"][
        "latent_dim"
    ]
    assert "encoded 24 images" in capsys.readouterr().out


def test_encode_errors(tiny_checkpoint, image_dir, tmp_path, capsys):
    not_ckpt = tmp_path / "not_ckpt"
    not_ckpt.mkdir()
    bad = tmp_path / "bad_images"
    shutil.copytree(image_dir, bad)
    (bad / "zz_broken.png").write_bytes(b"not an image")
    cases = [
        (["--model", str(tmp_path / "nope"), "--images", str(image_dir), "--out", str(tmp_path / "a.parquet")],
         "does not exist"),
        (["--model", str(not_ckpt), "--images", str(image_dir), "--out", str(tmp_path / "a.parquet")],
         "not a usable linewatch checkpoint"),
        (["--model", str(tiny_checkpoint), "--images", str(image_dir), "--out", str(tmp_path / "a.csv")],
         ".parquet"),
        (["--model", str(tiny_checkpoint), "--images", str(bad), "--out", str(tmp_path / "a.parquet")],
         "zz_broken.png"),
    ]
    for args, msg in cases:
        assert main(["encode", "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err, (args, err)
    assert not (tmp_path / "a.parquet").exists()


def _png_shape(path):
    with Image.open(path) as im:
        return im.size


def test_traverse_reconstruct_sample(tiny_checkpoint, image_dir, tmp_path, capsys):
    img = str(image_dir / "cell_0000.png")
    grid = tmp_path / "grid.png"
    assert main(["traverse", "--model", str(tiny_checkpoint), "--image", img, "--out", str(grid),
                 "--axes", "0", "2", "--values", "-2", "0", "2", "--steps", "3", "--device", "cpu"]) == 0
    w, h = _png_shape(grid)
    assert w > h  # 2 rows x (2 + 3) columns
    grid_all = tmp_path / "grid_all.png"
    assert main(["traverse", "--model", str(tiny_checkpoint), "--image", img, "--out", str(grid_all),
                 "--axes", "all", "--values", "-1", "1", "--steps", "2"]) == 0
    assert _png_shape(grid_all)[1] > h  # more rows

    rec = tmp_path / "rec.png"
    assert main(["reconstruct", "--model", str(tiny_checkpoint), "--image", img,
                 str(image_dir / "cell_0001.png"), "--out", str(rec), "--steps", "4"]) == 0
    assert rec.exists() and "mean |x - x_rec|" in capsys.readouterr().out

    samples, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert main(["sample", "--model", str(tiny_checkpoint), "--n", "5", "--out", str(samples), "--steps", "3",
                 "--npy", str(npy)]) == 0
    x = np.load(npy)
    assert x.shape[0] == 5 and np.isfinite(x).all() and np.abs(x).max() <= 1.0
    # seeded: the same command gives the same samples
    assert main(["sample", "--model", str(tiny_checkpoint), "--n", "5", "--out", str(samples), "--steps", "3",
                 "--npy", str(tmp_path / "t.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), x, atol=1e-5)


def test_traverse_and_sample_errors(tiny_checkpoint, image_dir, tmp_path, capsys):
    img = str(image_dir / "cell_0000.png")
    cases = [
        (["traverse", "--image", img, "--axes", "999"], "out of range"),
        (["traverse", "--image", img, "--axes", "x"], "--axes"),
        (["traverse", "--image", str(tmp_path / "none.png")], "does not exist"),
        (["reconstruct", "--image", img, str(tmp_path / "none.png")], "does not exist"),
        (["sample", "--n", "0"], "--n"),
    ]
    for args, msg in cases:
        rc = main([args[0], "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o.png"), *args[1:]])
        assert rc == 2, args
        assert msg in capsys.readouterr().err, args


# ------------------------------------------------------------------------------------------------ issue 14, item 11


@pytest.fixture(scope="module")
def fresh_checkpoint(tmp_path_factory):
    """An untrained tiny checkpoint (cheap): only its files matter here."""
    import torch

    from models import InfoDiffusion, get_preset, save_checkpoint

    p = get_preset("tiny")
    torch.manual_seed(0)
    return save_checkpoint(InfoDiffusion(p.model), tmp_path_factory.mktemp("fresh") / "ckpt", preprocess=p.preprocess)


BROKEN_CHECKPOINTS = {
    "flipped_weight_bytes": lambda c: H.corrupt_safetensors(c),
    "truncated_safetensors": lambda c: H.truncated_safetensors(c),
    "garbage_safetensors": lambda c: H.garbage_safetensors(c),
    "latent_dim_string": lambda c: H.wrong_type_config(c, "latent_dim", "eight"),
    "latent_dim_bool": lambda c: H.wrong_type_config(c, "latent_dim", True),
    "image_size_float": lambda c: H.wrong_type_config(c, "image_size", 32.5),
}


def one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"linewatch {command}: error:"), err
    return lines[0]


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
@pytest.mark.parametrize("command", ["encode", "traverse"])
def test_11_broken_checkpoint_one_line_exit_2(fresh_checkpoint, image_dir, tmp_path, capsys, case, command):
    ckpt = H.copy_checkpoint(fresh_checkpoint, tmp_path / "broken")
    BROKEN_CHECKPOINTS[case](ckpt)
    args = {"encode": ["--images", str(image_dir), "--out", str(tmp_path / "z.parquet"), "--no-progress"],
            "traverse": ["--image", str(image_dir / "cell_0000.png"), "--out", str(tmp_path / "g.png")]}[command]
    assert main([command, "--model", str(ckpt), *args]) == 2
    line = one_error_line(capsys, command)
    assert "broken" in line
    if case == "flipped_weight_bytes":
        assert "digest" in line


@pytest.mark.parametrize("command", ["encode", "traverse"])
def test_11_decompression_bomb_image_one_line_exit_2(fresh_checkpoint, image_dir, tmp_path, capsys, command):
    bombs = tmp_path / "bombs"
    shutil.copytree(image_dir, bombs)
    H.write(bombs / "zz_bomb.png", H.bomb_png())
    args = {"encode": ["--images", str(bombs), "--out", str(tmp_path / "z.parquet"), "--no-progress"],
            "traverse": ["--image", str(bombs / "zz_bomb.png"), "--out", str(tmp_path / "g.png")]}[command]
    assert main([command, "--model", str(fresh_checkpoint), *args]) == 2
    line = one_error_line(capsys, command)
    assert "zz_bomb.png" in line and "pixels" in line


def test_14_traverse_out_folder_prints_the_file_it_wrote(fresh_checkpoint, image_dir, tmp_path, capsys):
    out_dir = tmp_path / "grids"
    out_dir.mkdir()
    assert main(["traverse", "--model", str(fresh_checkpoint), "--image", str(image_dir / "cell_0000.png"),
                 "--out", str(out_dir), "--axes", "0", "--values", "0", "--steps", "1"]) == 0
    printed = capsys.readouterr().out.strip().rsplit("-> ", 1)[-1]
    assert Path(printed).is_file() and Path(printed).parent == out_dir
    assert list(out_dir.iterdir()) == [Path(printed)]
    assert main(["traverse", "--model", str(fresh_checkpoint), "--image", str(image_dir / "cell_0000.png"),
                 "--out", str(tmp_path / "noext"), "--axes", "0", "--values", "0", "--steps", "1"]) == 0
    printed = capsys.readouterr().out.strip().rsplit("-> ", 1)[-1]
    assert Path(printed).is_file() and Path(printed).suffix == ".png"


@pytest.mark.slow
def test_a_pretrained_preset_trains_traverses_and_reconstructs(image_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["train", "--images", str(image_dir), "--out", str(out), "--preset", "pretrained", "--steps", "2",
                 "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 0
    assert "features of" in capsys.readouterr().err  # the backbone read the cells once, then head + decoder trained
    img = str(sorted(image_dir.glob("*.png"))[0])
    assert main(["traverse", "--model", str(out), "--image", img, "--axes", "0", "--steps", "2",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert main(["reconstruct", "--model", str(out), "--image", img, "--steps", "2",
                 "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "t.png").exists() and (tmp_path / "r.png").exists()
    # linewatch score: the residual detector judges each image with the code its backbone features give
    capsys.readouterr()
    assert main(["score", "--model", str(out), "--images", img, "--reference", str(image_dir), "--fpr", "0.2",
                    "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_images"] == 1 and np.isfinite(doc["images"][0]["score"])
