import pytest

from cnnkit.config import DataConfig, TrainConfig, load_config
from cnnkit.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, {"train.epochs": 3, "model.name": "vgg", "data.image_size": 48})
    assert cfg.train.epochs == 3 and cfg.model.name == "vgg" and cfg.data.image_size == (48, 48)


def test_toml_file_and_unknown_key_suggestion(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("[train]\nepochs = 2\nbatch_size = 8\n[data]\nval_split = 0.1\n")
    cfg = load_config(path)
    assert cfg.train.batch_size == 8 and cfg.data.val_split == 0.1
    path.write_text("[train]\nepoch = 2\n")
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config(path)
    path.write_text('[train]\nepochs = "two"\nbatch_size = 8\n')  # a quoted number: named, with the fix
    with pytest.raises(ConfigError, match=r"\[train\] epochs='two' .*without quotes.*Received: epochs='two'$"):
        load_config(path)


@pytest.mark.parametrize("kwargs, field", [({"epochs": 0}, "epochs"), ({"augment": "heavy"}, "augment"),
                                           ({"batch_size": 0}, "batch_size")])
def test_train_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"Received: {field}="):
        TrainConfig(**kwargs)


def test_data_config_validation():
    with pytest.raises(ConfigError, match="val_split"):
        DataConfig(val_split=1.5)
    with pytest.raises(ConfigError, match="image_size"):
        DataConfig(image_size=(0, 224))
    with pytest.raises(ConfigError, match="color_mode"):
        DataConfig(color_mode="rgba")
    for seed in (-1, 2**32, 1.5):  # the shuffle's and split's random streams take 0 to 2**32 - 1
        with pytest.raises(ConfigError, match=f"Received: seed={seed!r}"):
            DataConfig(seed=seed)
    assert DataConfig(seed=0).seed == 0
