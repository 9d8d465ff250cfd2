import json

import pytest

from models import (
    PRESETS,
    DiffusionConfig,
    EncoderConfig,
    InfoDiffusionConfig,
    LossConfig,
    PreprocessSpec,
    TrainConfig,
    UNetConfig,
    get_preset,
)
from models.presets import Preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_config_round_trips_through_json(name):
    p = get_preset(name)
    for cfg in (p.model, p.train, p.preprocess):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(data) == cfg


def test_nested_from_dict_restores_types():
    cfg = InfoDiffusionConfig.from_dict(json.loads(json.dumps(get_preset("cpu").model.to_dict())))
    assert isinstance(cfg.unet, UNetConfig) and isinstance(cfg.unet.channel_mult, tuple)
    assert isinstance(cfg.encoder, EncoderConfig) and isinstance(cfg.loss, LossConfig)


def test_unknown_key_is_rejected():
    d = UNetConfig().to_dict() | {"widht": 3}
    with pytest.raises(ValueError, match="widht"):
        UNetConfig.from_dict(d)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: EncoderConfig(kind="resnet"), "kind"),
        (lambda: UNetConfig(base_channels=12, num_groups=8), "divisible"),
        (lambda: UNetConfig(dropout=1.5), "dropout"),
        (lambda: DiffusionConfig(schedule="quadratic"), "schedule"),
        (lambda: DiffusionConfig(beta_start=0.1, beta_end=0.01), "beta"),
        (lambda: LossConfig(zeta=1.5), "zeta"),
        (lambda: LossConfig(lambda_mmd=-1), "lambda_mmd"),
        (lambda: LossConfig(prior="cauchy"), "prior"),
        (lambda: InfoDiffusionConfig(image_size=30, unet=UNetConfig(channel_mult=(1, 2, 2))), "divisible"),
        (lambda: InfoDiffusionConfig(in_channels=4), "in_channels"),
        (lambda: InfoDiffusionConfig(latent_dim=3, loss=LossConfig(prior="mixture")), "even"),
        (lambda: TrainConfig(batch_size=1), "batch_size"),
        (lambda: TrainConfig(ema_decay=1.0), "ema_decay"),
        (lambda: PreprocessSpec(resample="nearest"), "resample"),
    ],
)
def test_bad_values_raise_clear_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_get_preset_unknown_lists_choices():
    with pytest.raises(ValueError, match="cpu.*large.*standard.*tiny"):
        get_preset("huge")


def test_preset_preprocess_must_match_model():
    p = get_preset("tiny")
    with pytest.raises(ValueError, match="does not match"):
        Preset("bad", p.model, p.train, PreprocessSpec(image_size=32))


def test_preset_defaults():
    assert get_preset("tiny").model.latent_dim == 8
    assert get_preset("cpu").model.latent_dim == 32 and get_preset("standard").model.image_size == 64
    assert get_preset("large").model.image_size == 128
    assert get_preset("cpu").model.encoder.kind == "down"


def test_replace_revalidates():
    with pytest.raises(ValueError):
        LossConfig().replace(zeta=2.0)
    assert LossConfig().replace(lambda_mmd=0.0).lambda_mmd == 0.0
