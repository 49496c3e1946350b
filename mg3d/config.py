"""Flat, frozen stage configs; presets; config files.

Every stage has a frozen dataclass config whose fields map 1:1 onto CLI options. Values are resolved in
this order, later wins: dataclass defaults < preset (``configs/<name>.yaml``) < ``--config FILE`` <
options given on the command line. Files are YAML or JSON, read with ``yaml.safe_load``; each holds one
section per stage (``capture: {frames: 40}``) and an optional ``schema`` version.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mg3d.errors import ConfigError

SCHEMA_VERSION = 1
PRESETS = ("tiny", "default", "quality")

C = TypeVar("C")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def switch(default: str) -> Any:
    """A dataclass field for an auto/on/off option: YAML 1.1 reads a bare on/off as a bool, which
    :func:`config_from_dict` takes back as "on"/"off" for such fields (and only for them)."""
    return dataclasses.field(default=default, metadata={"switch": True})


def config_from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from ``values``, refusing unknown keys and values of the wrong type.

    Example:
        >>> from mg3d.capture import CaptureConfig
        >>> config_from_dict(CaptureConfig, {"max_size": 256}).max_size
        256
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}",
            hint=f"valid options: {', '.join(fields)}",
        )
    hints = typing.get_type_hints(cls)
    values = {name: ("on" if value else "off") if isinstance(value, bool) and fields[name].metadata.get("switch") else value for name, value in values.items()}
    checked = {name: _check_type(name, value, hints[name], source) for name, value in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _check_type(name: str, value: Any, hint: Any, source: str) -> Any:
    """Coerce obvious cases (int for float, list for tuple) and reject the rest with a clear message."""
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for option in allowed:
        if option is type(None) and value is None:
            return None
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    names = " or ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ConfigError(f"{source}: option {name}={value!r} must be {names}")


def read_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a YAML/JSON config file into ``{stage: {option: value}}``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist", hint="check the path given to --config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON ({exc.__class__.__name__})") from None
    return _sections(data, str(path))


def load_preset(name: str) -> dict[str, dict[str, Any]]:
    """The ``{stage: {option: value}}`` sections of a shipped preset (``tiny``, ``default``, ``quality``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", hint=f"choose one of {', '.join(PRESETS)}")
    text = (resources.files("mg3d.configs") / f"{name}.yaml").read_text()
    return _sections(yaml.safe_load(text), f"preset {name}")


def _sections(data: Any, source: str) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of stage -> options, got {type(data).__name__}")
    schema = data.pop("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ConfigError(f"{source}: schema {schema} is not supported", hint=f"this mg3d reads schema {SCHEMA_VERSION}")
    for stage, options in data.items():
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: section {stage!r} must be a mapping of option -> value")
    return data


def resolve_config(
    cls: type[C],
    stage: str,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Defaults < preset < config file < explicit overrides, for one stage's config class."""
    values: dict[str, Any] = {}
    if preset:
        values.update(load_preset(preset).get(stage, {}))
    if config_file:
        values.update(read_config_file(config_file).get(stage, {}))
    values.update(overrides or {})
    return config_from_dict(cls, values, source=f"{stage} config")
