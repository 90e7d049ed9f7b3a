"""The typed config (fedms_jax/config.py): conversion from ConfigDicts, types, checks, no jax."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedms_jax.config import (
    Config, ConfigError, LoRAConfig, ModelConfig, apply_overrides, load_config, validate,
)

CONFIG_FILES = sorted(str(p) for p in (Path(__file__).parents[1] / "experiments" / "configs").glob("*.py"))


def _raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


@pytest.mark.parametrize("name", ["embedded", *CONFIG_FILES])
def test_every_shipped_config_converts_and_round_trips(name):
    cd = load_config(name)
    config = validate(cd)
    assert isinstance(config, Config)
    assert config.to_dict() == cd.to_dict()
    assert json.dumps(config.to_dict()) == json.dumps(cd.to_dict())  # same key order too


def test_the_dataclass_defaults_are_the_embedded_config():
    assert Config() == validate(load_config("embedded"))


def test_validate_is_idempotent():
    config = validate(load_config("embedded"))
    assert validate(config) is config


def test_overrides_keep_their_types():
    config = validate(apply_overrides(load_config("embedded"), [
        "rounds=3", "stage1_rounds=1", "lora.targets=q,v", "client.lr=1", "model.dtype=bfloat16",
        "client.cache_frozen=false",
    ]))
    assert config.rounds == 3 and type(config.rounds) is int
    assert config.lora.targets == ("q", "v")
    assert config.client.lr == 1.0 and type(config.client.lr) is float
    assert config.client.cache_frozen is False and config.model.dtype == "bfloat16"


def test_ints_become_floats_and_lists_tuples():
    d = load_config("embedded").to_dict()
    d["client"]["lr"] = 1
    d["lora"]["targets"] = ["q", "v"]
    config = Config.from_dict(d)
    assert type(config.client.lr) is float and config.lora.targets == ("q", "v")
    hash(config)  # frozen all the way down: usable as a static argument


def test_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.client.lr = 0.1
    assert dataclasses.replace(config, rounds=30).rounds == 30


@pytest.mark.parametrize("section, key", [("model", "depth"), (None, "epochs")])
def test_unknown_key_is_refused_by_name(section, key):
    cd = load_config("embedded")
    (cd[section] if section else cd)[key] = 3
    name = f"{section}.{key}" if section else key
    with _raises(f"unknown config key {name!r}"):
        validate(cd)


def test_missing_key_takes_its_default():
    d = load_config("embedded").to_dict()
    del d["data"]["train_examples"], d["placement"]
    config = Config.from_dict(d)
    assert config.data.train_examples == 0 and config.placement == Config().placement


def test_a_key_missing_from_a_file_can_still_be_overridden():
    import ml_collections

    d = load_config("embedded").to_dict()
    del d["eval_batch"], d["data"]["test_examples"]
    old_file = ml_collections.ConfigDict(d)  # a config file written before these keys existed
    config = validate(apply_overrides(old_file, ["eval_batch=64", "data.test_examples=100"]))
    assert config.eval_batch == 64 and config.data.test_examples == 100


def test_int_checks_name_key_and_value():
    with _raises("config.model.layers = True: must be an integer >= 1"):  # a bool is no count
        ModelConfig(layers=True)
    with _raises("config.seed = -1: must be an integer >= 0"):
        Config(seed=-1)
    with _raises("config.data.num_clients = 2.0: must be an integer >= 1"):
        Config.from_dict({"data": {"num_clients": 2.0}})


def test_type_checks_name_key_and_value():
    with _raises("config.client.lr = 'fast': must be a finite number"):
        Config.from_dict({"client": {"lr": "fast"}})
    with _raises("config.model.tune_head = 1: must be true or false"):
        Config.from_dict({"model": {"tune_head": 1}})
    with _raises("config.lora.targets = 'q': must be a tuple of strings"):
        LoRAConfig(targets="q")
    with _raises("config.model = 3: must be a section"):
        Config.from_dict({"model": 3})


def test_choice_check_names_key_value_and_choices():
    with _raises("config.model.dtype = 'float16': must be one of ['float32', 'bfloat16']"):
        ModelConfig(dtype="float16")
    with _raises("config.placement.backend = 'pmap': must be one of ['vmap', 'sequential']"):
        validate(apply_overrides(load_config("embedded"), ["placement.backend=pmap"]))
    with _raises("config.lora.targets = ('q', 'query'): each must be one of"):
        LoRAConfig(targets=("q", "query"))


def test_cross_section_checks():
    with _raises("config.sal.k0 = 5: must be <= model.layers=4"):
        validate(apply_overrides(load_config("embedded"), ["sal.k0=5"]))
    # A pretrained backbone's depth is unknown until it is loaded.
    validate(apply_overrides(load_config("embedded"), ["sal.k0=5", "model.pretrained=some/hub-id"]))
    with _raises("config.cohort_size = 30: must be <= data.num_clients=20"):
        dataclasses.replace(Config(), cohort_size=30)  # a variant is checked again
    with _raises("config.stage1_rounds = 24: must be < rounds=24"):
        dataclasses.replace(Config(), stage1_rounds=24)
    dataclasses.replace(Config(), stage1_rounds=24, algorithm="fedavg")  # one-stage: no stage 2 needed


def test_importing_the_config_imports_no_jax():
    """A bad config is refused before jax starts: the config (and a config file) loads no jax, flax or optax."""
    code = ("import fedms_jax.config, sys; fedms_jax.config.resolve('embedded', ['rounds=30']); "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')); "
            "assert not loaded, loaded")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_fingerprint_of_the_embedded_config_is_unchanged():
    """Checkpoints written when configs were ConfigDicts still resume: the typed config's
    fingerprint equals the one the raw ConfigDict gave (the flattening that was used then)."""
    from fedms_jax.checkpoint import _flatten, config_changes, config_fingerprint

    cd = load_config("embedded")
    before = json.loads(json.dumps(_flatten(cd.to_dict())))
    assert config_fingerprint(validate(cd)) == before
    assert json.dumps(config_fingerprint(validate(cd))) == json.dumps(before)
    assert config_changes(before, validate(cd)) == []


def test_fedadam_with_fedavgs_server_lr_is_an_error_naming_both_keys():
    from fed_helpers import tiny_config

    with pytest.raises(ConfigError) as e:
        tiny_config("server.optimizer=fedadam")
    assert "config.server.lr = 1.0" in str(e.value) and "config.server.optimizer = 'fedadam'" in str(e.value)
    assert tiny_config("server.optimizer=fedadam", "server.lr=0.01").server.lr == 0.01


def test_fedms_training_global_expert_under_tensor_layout_is_refused_by_name():
    """A known deadlock (FedMS stage 2 with the global expert training, mesh.strategy=tensor)
    is refused before anything compiles, naming the field and the way out."""
    from fed_helpers import tiny_config

    with pytest.raises(ConfigError) as e:
        tiny_config("algorithm=fedms", "stage1_rounds=1", "mesh.model=2", "mesh.strategy=tensor")
    assert "mesh.strategy" in str(e.value) and "fedms.train_global=false" in str(e.value)
    assert tiny_config("algorithm=fedms", "stage1_rounds=1", "mesh.model=2", "mesh.strategy=tensor",
                       "fedms.train_global=false").mesh.strategy == "tensor"
