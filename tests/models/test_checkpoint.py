import hashlib
import json

import pytest
import torch

from models import InfoDiffusion, get_preset, load_checkpoint, save_checkpoint
from models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_train_state


def test_trained_checkpoint_round_trip_gives_identical_outputs(trained_tiny, elpv16):
    ck = load_checkpoint(trained_tiny.out_dir)
    assert not ck.model.training
    assert ck.config == get_preset("tiny").model and ck.preprocess == get_preset("tiny").preprocess
    x = elpv16[:4]
    assert torch.equal(ck.model.encode(x), trained_tiny.model.encode(x))
    t = torch.tensor([0, 10, 500, 999])
    z = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(ck.model(x, t, z), trained_tiny.model(x, t, z))
    digest = hashlib.sha256((trained_tiny.out_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert ck.meta["model_id"] == digest[:16]
    assert ck.meta["step"] == 300 and ck.meta["preset"] == "tiny"


def test_train_state_loads_weights_only(trained_tiny):
    st = load_train_state(trained_tiny.out_dir)
    assert st["step"] == 300 and "optimizer" in st and "model" in st


def test_save_load_fresh_model(tmp_path):
    p = get_preset("tiny")
    torch.manual_seed(0)
    m = InfoDiffusion(p.model)
    out = save_checkpoint(m, tmp_path / "c", preprocess=p.preprocess, meta={"note": "x"})
    ck = load_checkpoint(out / CONFIG_NAME)  # a file inside the dir works too
    assert ck.meta["note"] == "x" and len(ck.meta["model_id"]) == 16
    for k, v in m.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)
    # overwrite in place (atomic replace), companion files kept, no temp dirs left behind
    (out / "latent_ddpm.json").write_text("{}")
    (out / "bundle").mkdir()
    (out / "bundle" / "ref.txt").write_text("r")
    save_checkpoint(m, out, preprocess=p.preprocess)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c"]
    assert (out / "latent_ddpm.json").exists() and (out / "bundle" / "ref.txt").read_text() == "r"


def test_refuses_to_replace_a_non_checkpoint_directory(tmp_path):
    p = get_preset("tiny")
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a checkpoint"):
        save_checkpoint(InfoDiffusion(p.model), tmp_path, preprocess=p.preprocess)
    assert (tmp_path / "precious.txt").exists()


def test_mismatched_config_fails_naming_the_key(tmp_path):
    p = get_preset("tiny")
    out = save_checkpoint(InfoDiffusion(p.model), tmp_path / "c", preprocess=p.preprocess)
    doc = json.loads((out / CONFIG_NAME).read_text())
    doc["model"]["latent_dim"] = 6
    (out / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="shape mismatch for 'encoder.fc"):
        load_checkpoint(out)
    doc["model"]["latent_dim"] = 8
    doc["model"]["unet"]["channel_mult"] = [1, 2, 2]
    (out / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="missing keys|unexpected keys"):
        load_checkpoint(out)
    doc["model"]["unet"]["channel_mult"] = [1, 2]
    doc["model"]["encoder"]["kind"] = "vit"
    (out / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="kind"):
        load_checkpoint(out)


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    p = get_preset("tiny")
    out = save_checkpoint(InfoDiffusion(p.model), tmp_path / "c", preprocess=p.preprocess)
    (out / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_checkpoint(out)
    with pytest.raises(FileNotFoundError, match="resume"):
        load_train_state(out)


def test_preprocess_must_match_model(tmp_path):
    p = get_preset("tiny")
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(InfoDiffusion(p.model), tmp_path / "c", preprocess=get_preset("cpu").preprocess)


def test_flipped_weight_bytes_are_refused_on_load(tmp_path):
    """Issue 14, item 9: a local checkpoint whose weights no longer hash to their recorded digest is not loaded."""
    p = get_preset("tiny")
    out = save_checkpoint(InfoDiffusion(p.model), tmp_path / "c", preprocess=p.preprocess)
    w = out / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[len(data) - 100] ^= 0xFF  # a tensor byte, the header stays valid
    w.chmod(0o644)
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        load_checkpoint(out)
    meta = json.loads((out / CONFIG_NAME).read_text())["meta"]
    assert len(meta["weights_sha256"]) == 64 and meta["model_id"] == meta["weights_sha256"][:16]


def test_wrong_types_in_config_are_refused(tmp_path):
    p = get_preset("tiny")
    out = save_checkpoint(InfoDiffusion(p.model), tmp_path / "c", preprocess=p.preprocess)
    doc = json.loads((out / CONFIG_NAME).read_text())
    for value in ("eight", True, 8.5):
        doc["model"]["latent_dim"] = value
        (out / CONFIG_NAME).write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="latent_dim"):
            load_checkpoint(out)
