"""Training configs: every value must have its field's type; a wrong one is named with what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, config_from_mapping, load_config


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"epochs": "ten"}, "epochs: input should be a valid integer, got 'ten'"),
        ({"lr": "0.003"}, "lr: input should be a valid number, got '0.003'"),
        # a plain constructor keeps "no", which Python counts as true: ImageNet weights would load
        ({"pretrained": "no"}, "pretrained: input should be a valid boolean, got 'no'"),
        ({"limit_train": "abc"}, "limit_train: input should be a valid integer"),
        ({"reviewed_weights": [1, "x"]}, "reviewed_weights: input should be a valid number"),
        ({"image_size": 300.5}, "image_size: input should be a valid integer"),
    ],
)
def test_value_of_the_wrong_type_is_refused(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match="bad config value") as caught:
        config_from_mapping(values)
    assert expected in str(caught.value)


def test_numbers_keep_their_field_types() -> None:
    config = config_from_mapping({"lr": 1, "epochs": 2, "limit_train": None, "reviewed_sets": ["a"]})
    assert isinstance(config.lr, float) and config.lr == 1.0 and config.epochs == 2
    assert config.reviewed_sets == ["a"]


def test_image_size_other_than_the_cells_is_refused() -> None:
    # training never resamples the 300 px cells; a card saying 160 would make serving feed 160 px
    with pytest.raises(ConfigError, match="image_size must be 300"):
        config_from_mapping({"image_size": 160})


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"\x82\xff\x00binary", "is not valid YAML text"), (b"key: [unclosed\n", "is not valid YAML text")],
)
def test_unreadable_config_is_one_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
