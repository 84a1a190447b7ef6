"""Config values are checked against the dataclass field types; errors name the dotted key."""

from __future__ import annotations

import dataclasses

import pytest

from hnseg_keras import configs
from hnseg_keras.data.phantom import PhantomConfig
from hnseg_keras.data.prepare import PrepareConfig
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.pipeline import PipelineConfig
from hnseg_keras.model.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    flag: bool = False
    count: int = 1
    rate: float = 0.5
    name: str = "x"
    pair: tuple[float, float] = (1.0, 2.0)
    window: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    seed: int = 0
    data: str | None = None


@pytest.mark.parametrize("cls", [SlicingConfig, PrepareConfig, PhantomConfig, AugmentConfig, PipelineConfig,
                                 UNetConfig, Outer])
def test_defaults_round_trip(cls):
    config = cls()
    assert configs.from_dict(cls, configs.to_dict(config)) == config


@pytest.mark.parametrize("text", ["no", "yes", "maybe", "1", "0", "True"])
def test_bool_takes_true_or_false_only(text):
    with pytest.raises(HnsegError, match=r"^inner\.flag: expected true or false"):
        configs.replace_from_overrides(Outer(), [f"inner.flag={text}"])


def test_bool_true_false_and_types_converted():
    config = configs.replace_from_overrides(Outer(), ["inner.flag=true", "inner.count=3", "inner.rate=2",
                                                      "inner.pair=[3,4]", "inner.window=[-100,200]", "data=123"])
    assert config.inner == Inner(flag=True, count=3, rate=2.0, name="x", pair=(3.0, 4.0), window=(-100.0, 200.0))
    assert isinstance(config.inner.rate, float) and isinstance(config.inner.pair, tuple)
    assert config.data == "123"  # a string field keeps the text as given
    assert configs.replace_from_overrides(Outer(), ["inner.flag=false"]).inner.flag is False


@pytest.mark.parametrize("override, message", [
    ("seed=abc", r"^seed: expected an integer, got \"abc\""),
    ("seed=1.5", r"^seed: expected an integer"),
    ("seed=true", r"^seed: expected an integer"),
    ("inner.rate=fast", r"^inner\.rate: expected a number"),
    ("inner.pair=[1,2,3]", r"^inner\.pair: expected a list of 2 values, got 3"),
    ("inner.pair=[1,\"a\"]", r"^inner\.pair\[1\]: expected a number"),
    ("inner.window=5", r"^inner\.window: expected a list.* or null"),
    ("inner=3", r"^inner: expected a section"),
])
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(HnsegError, match=message):
        configs.replace_from_overrides(Outer(), [override])


def test_json_config_is_checked_too():
    with pytest.raises(HnsegError, match=r"^inner\.count: expected an integer, got \"3\""):
        configs.from_dict(Outer, {"inner": {"count": "3"}})
    with pytest.raises(HnsegError, match=r"inner\.bogus"):
        configs.from_dict(Outer, {"inner": {"bogus": 1}})


def test_train_config_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from hnseg_keras import cli

    monkeypatch.chdir(tmp_path)
    for override, key in (("pipeline.jit_compile=no", "pipeline.jit_compile"), ("seed=abc", "seed"),
                          ("mixed_precision=yes", "mixed_precision"), ("augment.mixup=maybe", "augment.mixup")):
        out = tmp_path / "run"
        assert cli.main(["train", "--variant", "S", "--out", str(out), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"error: {key}: expected" in err
        assert not out.exists() and not (tmp_path / "tfrecords").exists() and not (tmp_path / "runs").exists()
    # the message names the key, on one line
    from hnseg_keras.training.config import load_config
    with pytest.raises(HnsegError, match=r"^pipeline\.jit_compile: expected true or false, got \"no\"$"):
        load_config("S", None, ["pipeline.jit_compile=no"])
