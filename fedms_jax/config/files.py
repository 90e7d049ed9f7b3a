"""Config files and overrides: Python files with ``get_config()`` returning an ml_collections
ConfigDict (as in the Flax examples); built-in ones in ``fedms_jax/configs/`` are selected by
name. ``--config.KEY=VALUE`` overrides apply to the ConfigDict; ``validate`` converts it, once, to
a ``Config``; ``resolve`` does all three."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_collections

from fedms_jax.config.base import ConfigError, _hints
from fedms_jax.config.schema import Config, validate

CONFIG_DIR = Path(__file__).parents[1] / "configs"


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
            kind = type(current[0]) if current else _tuple_item(key)
            return tuple(kind(s) for s in items)
        return text
    except ValueError:
        raise ConfigError(
            f"--config.{key}={text!r} is not a valid {type(current).__name__}"
        ) from None


def _tuple_item(key: str) -> type:
    """The item type of the tuple field at dotted ``key`` in the schema (str if unknown): an
    empty default (``sal.budgets = ()``) still parses ``4,8,12`` as ints."""
    cls: Any = Config
    for part in key.split("."):
        hint = _hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return str
        cls = hint
    args = typing.get_args(cls)
    return args[0] if args and args[0] in (int, float, str) else str


def _with_defaults(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
    """``values`` with every key it lacks taken from ``defaults`` (recursively)."""
    out = dict(defaults)
    for key, v in values.items():
        d = defaults.get(key)
        out[key] = _with_defaults(v, d) if isinstance(v, Mapping) and isinstance(d, Mapping) else v
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``KEY=VALUE`` strings (dotted keys) with the existing field's type. Keys the file
    does not set (e.g. ones added after it was written) can be overridden too: they take the
    schema's default first."""
    config = ml_collections.ConfigDict(_with_defaults(config.to_dict(), Config().to_dict()))
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



def resolve(name_or_file: str | None, overrides: Iterable[str] = ()) -> Config:
    """The validated ``Config`` of a built-in config name or a config file, with ``KEY=VALUE``
    overrides applied: ``validate(apply_overrides(load_config(name_or_file), overrides))``."""
    return validate(apply_overrides(load_config(name_or_file), overrides))
