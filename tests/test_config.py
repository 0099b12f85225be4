"""TrialConfig: defaults, overrides, and error messages that name the field and the choices."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from trainables.config import TrialConfig, format_validation_error, parse_overrides


def errors_of(**values) -> str:
    with pytest.raises(ValidationError) as info:
        TrialConfig(**values)
    return format_validation_error(info.value, "file.yaml")


def test_defaults_are_the_offline_quickstart():
    cfg = TrialConfig()
    assert (cfg.dataset, cfg.model, cfg.norm, cfg.regime) == ("digits", "cnn", "batchnorm", "standard")
    assert cfg.primary_attack == "fgsm" and cfg.primary_eps == 0.05


def test_overrides_are_yaml_scalars_and_comma_lists():
    values = parse_overrides(
        ["epochs=3", "lr=1e-3", "norm_affine=false", "eval_attacks=fgsm,pgd", "eval_eps=0.05,0.1", "train_subset=none"]
    )
    cfg = TrialConfig(**values)
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.norm_affine is False
    assert cfg.eval_attacks == ["fgsm", "pgd"] and cfg.eval_eps == [0.05, 0.1]
    assert cfg.train_subset is None
    assert TrialConfig(**parse_overrides(["norm=none"])).norm == "none"  # a registry name, not None
    assert TrialConfig(eval_eps=0.1).eval_eps == [0.1]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["epochs"])


def test_unknown_field_is_rejected_by_name():
    msg = errors_of(epoch=3)
    assert "file.yaml: epoch: Extra inputs are not permitted" in msg


@pytest.mark.parametrize(
    ("field", "value", "listed"),
    [
        ("norm", "robustnrom", "robustnorm_batchstats"),
        ("model", "resnet18", "preact_resnet18"),
        ("dataset", "imagenet", "imagefolder"),
        ("regime", "madry", "pgd_at"),
        ("eval_attacks", "fgsm,deepfool", "autoattack"),
        ("optimizer", "lion", "adamw"),
        ("lr_schedule", "exp", "cosine"),
        ("augment", "mixup", "crop_flip"),
    ],
)
def test_unknown_registry_names_list_the_known_ones(field, value, listed):
    msg = errors_of(**{field: value})
    assert msg.startswith(f"file.yaml: {field}") and repr(value.split(",")[-1]) in msg and listed in msg


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"eval_eps": [0.1, 1.5]}, "eval_eps.1: Input should be less than or equal to 1"),
        ({"train_eps": -0.1}, "train_eps: Input should be greater than or equal to 0"),
        ({"batch_size": 1}, "batch_size: Input should be greater than or equal to 2"),
        ({"eval_batch_size": 1}, "eval_batch_size"),
        ({"device": "gpu"}, "device: unknown device 'gpu'"),
        ({"dataset": "cifar10"}, "set data_dir"),
        ({"lr_schedule": "step"}, "lr_milestones"),
        ({"eval_attacks": "pgd,pgd"}, "listed twice"),
        ({"epochs": "ten"}, "epochs: Input should be a valid integer"),
    ],
)
def test_bad_values_are_explained(values, needle):
    assert needle in errors_of(**values)


def test_norm_options_follow_the_chosen_norm():
    assert TrialConfig(norm="robustnorm", norm_power=0.3).norm_options() == {
        "power": 0.3,
        "momentum": 0.1,
        "eps": 1e-5,
        "affine": True,
    }
    assert TrialConfig(norm="groupnorm").norm_options() == {"groups": 32, "eps": 1e-5, "affine": True}
    assert TrialConfig(norm="none").norm_options() == {}


def test_config_is_immutable_and_round_trips():
    cfg = TrialConfig(norm="robustnorm", eval_eps="0.03,0.1")
    with pytest.raises(ValidationError):
        cfg.epochs = 3  # type: ignore[misc]
    assert TrialConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    assert cfg.differing(TrialConfig(norm="robustnorm", eval_eps="0.03,0.1", device="cpu"), ignore=("device",)) == []
    assert cfg.differing(TrialConfig(norm="batchnorm", eval_eps="0.03,0.1")) == ["norm"]
