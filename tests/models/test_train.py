import pytest
import torch

from models import get_preset, load_checkpoint, train
from models.train import config_diff, lr_at


def _tiny(**train_kw):
    p = get_preset("tiny")
    return p.__class__(p.name, p.model, p.train.replace(**train_kw), p.preprocess)


def test_lr_schedule():
    kw = {"lr": 1.0, "warmup_steps": 10, "total_steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)


def test_config_diff_names_keys():
    assert config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c: 2 != 3"]


def test_history_and_seeded_determinism(elpv16):
    p = _tiny(log_every=5, batch_size=8)
    a = train(p, elpv16, None, steps=10, progress=False, device="cpu")
    b = train(p, elpv16, None, steps=10, progress=False, device="cpu")
    assert [h["step"] for h in a.history] == [5, 10]
    assert set(a.history[0]) == {"step", "loss", "eps_mse", "mmd", "kl", "lr"}
    assert a.history == b.history and a.step == 10 and a.images_per_s > 0
    assert not a.model.training


def test_resume_continues_the_step_count(elpv16, tmp_path):
    p = _tiny(checkpoint_every=5, log_every=5, batch_size=8)
    out = tmp_path / "run"
    first = train(p, elpv16, out, steps=10, progress=False, device="cpu")
    assert first.step == 10 and load_checkpoint(out).meta["step"] == 10
    with pytest.raises(ValueError, match="resume=True"):
        train(p, elpv16, out, steps=20, progress=False, device="cpu")
    second = train(p, elpv16, out, steps=20, resume=True, progress=False, device="cpu")
    assert second.step == 20 and [h["step"] for h in second.history] == [5, 10, 15, 20]
    # resuming = one uninterrupted run of the same length (same data order, noise and optimizer state)
    straight = train(p, elpv16, tmp_path / "straight", steps=20, progress=False, device="cpu")
    assert second.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-4)


def test_on_step_can_stop_early_and_checkpoint_is_written(elpv16, tmp_path):
    p = _tiny(log_every=2, batch_size=8)
    res = train(
        p,
        elpv16,
        tmp_path / "r",
        steps=50,
        progress=False,
        device="cpu",
        on_step=lambda rec: rec["step"] >= 4,
    )
    assert res.step == 4 and load_checkpoint(tmp_path / "r").meta["step"] == 4


def test_init_from_warm_starts(trained_tiny, elpv16, tmp_path):
    p = _tiny(batch_size=8, lr=1e-8, warmup_steps=0, ema_decay=0.0)
    res = train(
        p, elpv16, tmp_path / "w", steps=1, init_from=trained_tiny.out_dir, progress=False, device="cpu"
    )
    src = trained_tiny.model.state_dict()
    for k, v in res.model.state_dict().items():
        assert torch.allclose(v, src[k], atol=1e-5), k


def test_init_from_mismatched_config_fails(trained_tiny, elpv16, tmp_path):
    p = get_preset("tiny")
    other = p.__class__(p.name, p.model.replace(latent_dim=4), p.train, p.preprocess)
    with pytest.raises(ValueError, match="latent_dim: 8 != 4"):
        train(
            other,
            elpv16,
            tmp_path / "x",
            steps=1,
            init_from=trained_tiny.out_dir,
            progress=False,
            device="cpu",
        )


def test_bad_data_is_rejected(tmp_path):
    p = get_preset("tiny")
    with pytest.raises(ValueError, match="image_size"):
        train(p, torch.zeros(4, 1, 32, 32), None, steps=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train(p, torch.full((4, 1, 16, 16), 200.0), None, steps=1, progress=False, device="cpu")


def test_refuses_a_non_empty_non_checkpoint_out_dir(elpv16, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        train(_tiny(batch_size=8), elpv16, tmp_path, steps=1, progress=False, device="cpu")


def test_dataset_input(elpv16):
    ds = torch.utils.data.TensorDataset(elpv16)
    res = train(_tiny(batch_size=8, log_every=2), ds, None, steps=4, progress=False, device="cpu")
    assert res.step == 4 and len(res.history) == 2
