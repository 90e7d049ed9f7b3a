"""Run configuration: ml_collections ConfigDicts, overrides from the command line, validation.

Configs are Python files with ``get_config()`` (as in the Flax examples). Built-in ones live in
``fedms_jax/configs/`` and are selected by name; any other path is loaded as a file. Every value
is validated here, before anything is compiled, and a bad one is a ``ConfigError`` naming the key
and the value.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable

import ml_collections

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """An unknown key or an invalid value in a run configuration."""


def load_config(name_or_file: str | None) -> ml_collections.ConfigDict:
    """A built-in config by name (``embedded``) or a Python file defining ``get_config()``."""
    name_or_file = name_or_file or "embedded"
    path = Path(name_or_file)
    if path.suffix != ".py":
        builtin = CONFIG_DIR / f"{name_or_file}.py"
        if not builtin.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
            raise ConfigError(f"--config {name_or_file!r} is neither a .py file nor one of {known}")
        path = builtin
    if not path.exists():
        raise ConfigError(f"--config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_fedms_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    return module.get_config()


def _parse_value(key: str, text: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            items = [s.strip() for s in text.split(",") if s.strip()]
            kind = type(current[0]) if current else str
            return tuple(kind(s) for s in items)
        return text
    except ValueError:
        raise ConfigError(
            f"--config.{key}={text!r} is not a valid {type(current).__name__}"
        ) from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``KEY=VALUE`` strings (dotted keys) with the existing field's type."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be KEY=VALUE")
        key, text = item.split("=", 1)
        node: Any = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ConfigError(f"unknown config key {key!r} ({part!r} is not in {where}: {known})")
            if i < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section, not a value")
        node[parts[-1]] = _parse_value(key, text, node[parts[-1]])
    return config


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} = {value!r}: {what}")


def _check_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> None:
    value = _get(config, key)
    choices = tuple(choices)
    _check(value in choices, key, value, f"must be one of {list(choices)}")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config is missing key {key!r}")
        node = node[part]
    return node


def _positive_int(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        v = _get(config, key)
        lo = 0 if allow_zero else 1
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= lo, key, v, f"must be an integer >= {lo}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every value; raises ConfigError naming the first bad key and its value."""
    from fedms_jax.models.lora import LORA_TARGETS

    _positive_int(config, "seed", allow_zero=True)
    _positive_int(config, "rounds", "model.layers", "model.hidden", "model.heads", "model.mlp_dim")
    _positive_int(config, "model.patch_size", "model.image_size", "lora.rank")
    _positive_int(config, "client.local_steps", "client.batch_size", "sal.k0", "sal.step", "sal.every")
    _check_choice(config, "model.dtype", ("float32", "bfloat16"))
    _check_choice(config, "model.head", ("linear", "zero_shot"))
    _check_choice(config, "client.optimizer", ("sgd", "momentum", "adamw"))
    _check_choice(config, "client.schedule", ("constant", "cosine"))
    _check(isinstance(config.client.cache_frozen, bool), "client.cache_frozen", config.client.cache_frozen, "must be true or false")
    _check_choice(config, "sal.mode", ("progressive", "all", "fixed"))
    m = config.model
    _check(m.hidden % m.heads == 0, "model.hidden", m.hidden, f"must be divisible by model.heads={m.heads}")
    _check(m.image_size % m.patch_size == 0, "model.image_size", m.image_size,
           f"must be divisible by model.patch_size={m.patch_size}")
    _check(config.sal.k0 <= m.layers or bool(m.pretrained), "sal.k0", config.sal.k0,
           f"must be <= model.layers={m.layers}")
    _check(config.lora.alpha > 0, "lora.alpha", config.lora.alpha, "must be > 0")
    _check(0.0 <= config.lora.dropout < 1.0, "lora.dropout", config.lora.dropout, "must be in [0, 1)")
    targets = tuple(config.lora.targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    _check(not bad and len(targets) > 0, "lora.targets", targets, f"each must be one of {list(LORA_TARGETS)}")
    _check(config.client.lr > 0, "client.lr", config.client.lr, "must be > 0")
    from fedms_jax.federated.algorithms import ALGORITHMS
    from fedms_jax.mofm import MIX_MODES

    _check_choice(config, "algorithm", ALGORITHMS)
    _positive_int(config, "stage1_rounds", allow_zero=True)
    _positive_int(config, "eval_clients", "fedms.gate_rank")
    if config.algorithm in ("fedms", "finetune"):
        _check(config.stage1_rounds < config.rounds, "stage1_rounds", config.stage1_rounds,
               f"must be < rounds={config.rounds} (stage 2 needs at least one round)")
    _check_choice(config, "fedms.gate", ("learned", "fixed"))
    _check_choice(config, "fedms.mixing", MIX_MODES)
    _check_choice(config, "fedms.gate_input", ("mean", "cls"))
    _check(0.0 <= config.fedms.local_weight <= 1.0, "fedms.local_weight", config.fedms.local_weight, "must be in [0, 1]")
    _check(config.fedms.aux_weight >= 0, "fedms.aux_weight", config.fedms.aux_weight, "must be >= 0")
    _check(config.fedprox.mu >= 0, "fedprox.mu", config.fedprox.mu, "must be >= 0")
    _check("{}" in config.model.prompt, "model.prompt", config.model.prompt, "must contain '{}' for the class name")
    _check(config.model.head == "linear" or bool(config.model.pretrained), "model.head", config.model.head,
           "'zero_shot' needs a CLIP checkpoint in model.pretrained")
    _check_choice(config, "data.partition", ("dirichlet", "shards", "iid"))
    _check_choice(config, "server.optimizer", ("fedavg", "fedadam"))
    _check_choice(config, "placement.backend", ("vmap", "sequential"))
    _positive_int(config, "data.num_clients", "cohort_size", "data.min_examples", "data.shards_per_client", "eval_every")
    _positive_int(config, "placement.chunk_size", "checkpoint.every", allow_zero=True)
    _positive_int(config, "checkpoint.keep", "mesh.model")
    _positive_int(config, "mesh.clients", allow_zero=True)
    _check_choice(config, "mesh.strategy", ("replicated", "fsdp", "tensor"))
    _check(config.mesh.strategy != "replicated" or config.mesh.model == 1, "mesh.strategy", config.mesh.strategy,
           f"'replicated' puts the whole backbone on every device: needs mesh.model=1, got {config.mesh.model}")
    _check(config.data.alpha > 0, "data.alpha", config.data.alpha, "must be > 0")
    _positive_int(config, "data.image_size", "data.train_examples", "data.test_examples", allow_zero=True)
    _check(config.data.name not in ("idx", "folder") or bool(config.data.data_dir), "data.data_dir",
           config.data.data_dir, f"data.name={config.data.name!r} reads local files: name their directory")
    _check(config.server.lr > 0, "server.lr", config.server.lr, "must be > 0")
    _check(config.cohort_size <= config.data.num_clients, "cohort_size", config.cohort_size,
           f"must be <= data.num_clients={config.data.num_clients}")
    chunk = config.placement.chunk_size
    _check(chunk == 0 or config.cohort_size % chunk == 0, "placement.chunk_size", chunk,
           f"must divide cohort_size={config.cohort_size}")
    return config
