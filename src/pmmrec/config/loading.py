"""Loading: YAML recipes (with line numbers) + dotted overrides -> a typed, validated :class:`Config`.

Unknown keys and wrong types are errors that name the file, the line, the key and a close match.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pmmrec.config.schema import Config
from pmmrec.errors import ConfigError
from pmmrec.utils.io import atomic_write_text


class _Where:
    """Where a value came from, for error messages: ``configs/x.yaml:12`` or ``override 'model.fusion=...'``."""

    def __init__(self):
        self.lines: dict[str, str] = {}

    def of(self, key: str) -> str:
        return self.lines.get(key, "")


def _record_lines(node: yaml.Node, path: str, source: str, where: _Where) -> None:
    """Record the line of every mapping key (dotted) so errors can point at it; reject duplicate keys."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen = set()
    for key_node, value_node in node.value:
        dotted = f"{path}.{key_node.value}" if path else str(key_node.value)
        if dotted in seen:
            raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: key '{dotted}' appears twice")
        seen.add(dotted)
        where.lines[dotted] = f"{source}:{key_node.start_mark.line + 1}"
        _record_lines(value_node, dotted, source, where)


def _read_yaml(path: Path, where: _Where) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    _record_lines(node, "", str(path), where)
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.fusion=sum"`` -> ``("model.fusion", "sum")``; the value is parsed as YAML (numbers, lists...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. model.fusion=sum)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string that merely looks odd to YAML, e.g. "a: b"
    return key, value


def _close_match(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        sub = _dataclass_type(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_all_keys(sub, dotted + "."))
    return keys


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raise ConfigError."""
    loc = f"{where}: " if where else ""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{loc}'{key}' must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (and no/yes) as a boolean
            value = next((word for word in (("on", "yes") if value else ("off", "no")) if word in choices), value)
        if value not in choices:
            hint = _close_match(str(value), [str(c) for c in choices])
            raise ConfigError(f"{loc}'{key}' must be one of {list(choices)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{loc}'{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{loc}'{key}' must be a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {str(k): _coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{loc}'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{loc}'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{loc}'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{loc}'{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in this module, not user error


def _build(cls: type, values: dict[str, Any], prefix: str, where: _Where, all_keys: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            loc = where.of(dotted)
            raise ConfigError(f"{loc + ': ' if loc else ''}unknown key '{dotted}'{_close_match(dotted, all_keys)}")
        sub = _dataclass_type(hints[key])
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where.of(dotted) or 'config'}: '{dotted}' must be a section (a mapping)")
            kwargs[key] = _build(sub, value, dotted + ".", where, all_keys)
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, where.of(dotted))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the field; add the file when every field came from one place.
        lines = {where.of(f"{prefix}{k}") for k in values} - {""}
        raise ConfigError(f"{lines.pop()}: {e}" if len(lines) == 1 else str(e)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None, base_source: str = "checkpoint") -> Config:
    """Load a YAML recipe (or only defaults when ``path`` is None) and apply ``dotted.key=value`` overrides.

    ``base`` (e.g. the config stored in a checkpoint) sits under the recipe: keys the recipe or the overrides
    set win, every other key keeps the base's value.
    """
    where = _Where()
    tree: dict[str, Any] = {}
    if base is not None:
        tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy holding only plain YAML types
        for key in _all_keys(Config):
            where.lines[key] = base_source
    if path is not None:
        tree = _merge(tree, _read_yaml(Path(path), where))
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        for i in range(1, len(parts) + 1):  # so "unknown key 'trian'" also names the override
            if base is None or where.lines.get(".".join(parts[:i])) in (None, base_source):
                where.lines[".".join(parts[:i])] = f"override '{text}'"
        where.lines[key] = f"override '{text}'"
        _set_dotted(tree, key, value)
    return _build(Config, tree, "", where, _all_keys(Config))


# Keys that earlier versions accepted but never read; configs stored in their checkpoints still load.
RETIRED_KEYS = ("objectives.nicl.pooling", "run.keep_last_k")


def config_from_dict(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     source: str = "checkpoint") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint), then apply overrides."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy holding only plain YAML types
    for dotted in RETIRED_KEYS:
        *parents, last = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return load_config(None, overrides, base=tree, base_source=source)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_config(config: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every field, defaults included) atomically."""
    atomic_write_text(path, config_to_yaml(config))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "weights":  # objectives.weights compares as one value
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``"key: X (saved), now Y"`` for every setting that differs between two ``Config.to_dict()`` trees, except
    the keys in ``ignore`` (and retired keys, see :data:`RETIRED_KEYS`)."""
    a, b = _flatten(saved), _flatten(now)
    skip = set(ignore) | set(RETIRED_KEYS)
    return [f"{key}: {a.get(key)!r} (saved), now {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in skip and a.get(key) != b.get(key)]
