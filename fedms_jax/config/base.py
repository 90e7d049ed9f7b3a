"""The config schema's machinery: ``ConfigError``, the ``_Section`` base (type checks, then each
section's ``_validate``) and field helpers. No jax (nor any module that imports it)."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from typing import Any, ClassVar, Iterable

INT64_MAX = 2**63 - 1  # larger integers would overflow inside the run


class ConfigError(ValueError):
    """An unknown key or an invalid value in a run configuration."""


def _check(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} = {value!r}: {what}")


def _int(default: int, lo: int = 1) -> Any:
    """An integer field whose smallest valid value is ``lo`` (every int in the config has one)."""
    return dataclasses.field(default=default, metadata={"lo": lo})


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Section:
    """What every config dataclass shares: type checks (then ``_validate``) and ``to_dict``.

    ``_key`` is the section's dotted prefix in error messages (``'model.'``; ``''`` at the top)."""

    _key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, v, kind = self._key + f.name, getattr(self, f.name), hints[f.name]
            if kind is int:  # bool is an int subclass: True is no count
                lo = f.metadata["lo"]
                _check(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo, key, v,
                       f"must be an integer >= {lo}")
                _check(v <= INT64_MAX, key, v, "must be <= 2**63 - 1")
                v = int(v)
            elif kind is float:  # ints are fine (lr = 1), stored as floats
                _check(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), key, v,
                       "must be a finite number")
                v = float(v)
            elif kind is bool:
                _check(isinstance(v, bool), key, v, "must be true or false")
            elif kind is str:
                _check(isinstance(v, str), key, v, "must be a string")
            elif kind == tuple[str, ...]:  # a list from a file is fine; stored as a (hashable) tuple
                _check(isinstance(v, (tuple, list)) and all(isinstance(s, str) for s in v), key, v,
                       "must be a tuple of strings")
                v = tuple(v)
            elif kind == tuple[int, ...]:
                _check(isinstance(v, (tuple, list)) and all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v), key, v,
                       "must be a tuple of integers")
                v = tuple(int(x) for x in v)
            elif kind == tuple[float, ...]:
                _check(isinstance(v, (tuple, list)) and all(
                    isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v), key, v,
                       "must be a tuple of numbers")
                v = tuple(float(x) for x in v)
            else:  # a section
                _check(isinstance(v, kind), key, v, f"must be a {kind.__name__}")
            object.__setattr__(self, f.name, v)
        self._validate()

    def _validate(self) -> None:
        """Checks of values beyond their types (the subclass's own)."""

    def _check(self, ok: bool, name: str, what: str) -> None:
        _check(ok, self._key + name, getattr(self, name), what)

    def _choice(self, name: str, choices: Iterable[str]) -> None:
        self._check(getattr(self, name) in choices, name, f"must be one of {list(choices)}")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts, keys sorted: what ``ConfigDict.to_dict()`` gives for this config."""
        return {
            f.name: v.to_dict() if isinstance(v, _Section) else v
            for f in sorted(dataclasses.fields(self), key=lambda f: f.name)
            for v in [getattr(self, f.name)]
        }

