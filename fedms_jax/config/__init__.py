"""Run configuration: the typed schema (defaults, docs, every check) and loading it.

* ``schema``/``sections``/``system``: one frozen dataclass per section (``ModelConfig``, ``ClientConfig``,
  ...) under ``Config``, one line of doc per field; each section checks its own fields in
  ``__post_init__``, ``Config`` the ones that span sections, so a ``Config`` that exists is valid;
* ``fedms_jax.choices``: the choices of the string-valued options (the modules that implement
  them import the same tuples);
* ``files``: config files (``get_config()`` returning an ml_collections ConfigDict, as in the
  Flax examples; built-in ones in ``fedms_jax/configs/`` by name), ``KEY=VALUE`` overrides, and
  ``resolve(name_or_file, overrides)`` -> a validated ``Config``.

A bad value is a ``ConfigError`` naming the key and the value. This package imports no jax, flax
or optax (nor any fedms_jax module that does; tested), so a bad config is refused before anything
is compiled, or even before jax starts.
"""
from fedms_jax.choices import *  # noqa: F401,F403  (the choice tuples, as config.ALGORITHMS etc.)
from fedms_jax.config.base import INT64_MAX, ConfigError
from fedms_jax.config.files import CONFIG_DIR, apply_overrides, load_config, resolve
from fedms_jax.config.schema import Config, validate
from fedms_jax.config.sections import (
    CheckpointConfig, ClientConfig, CompileConfig, DataConfig, DittoConfig, DPConfig, FedMSConfig, FedProxConfig,
    FedRepConfig, GuardConfig, LoRAConfig, MeshConfig, ModelConfig, MultihostConfig, PlacementConfig,
    PopulationConfig, SALConfig, ServerConfig,
)
from fedms_jax.config.system import SystemConfig
