"""Load layered YAML files and dotted command-line overrides into a `JobConfig`.

Layers merge section by section: a later file (or override) replaces single keys of an earlier one.
A mapping-valued key (`optimizer.lr_multipliers`) is replaced whole, `section.key={name: value}`,
or one entry at a time by an override `section.key.name=value`.
A file may start with `base: [...]` (preset names, or paths relative to that file), loaded before
its own keys. Every key and value is checked against the dataclasses in `schema.py` as it is read,
so an error names the file or override it came from. Checks that span fields (batch arithmetic,
parallel layout, stage rules) belong to `validate.py`; `load_config` does not run them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from calm_dist.common.atomic import atomic_write_text
from calm_dist.config.errors import ConfigError
from calm_dist.config.schema import DerivedConfig, JobConfig

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# The user-settable sections and, per section, each field's type. `derived` is filled by validation.
_SECTION_TYPES = {k: v for k, v in typing.get_type_hints(JobConfig).items() if k != "derived"}
_FIELD_TYPES = {name: typing.get_type_hints(cls) for name, cls in _SECTION_TYPES.items()}

Sections = dict[str, dict[str, Any]]  # {"model": {"hidden_size": 512}, ...}, already type-checked


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float: YAML 1.1 insists on `1.0e-3`, users do not."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


# ---- public API --------------------------------------------------------------------------------


def load_config(config_paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> JobConfig:
    """Merge the files (or preset names) left to right, then the `section.key=value` overrides.
    The result is type-checked but NOT validated: call `validate()` before building anything."""
    if isinstance(config_paths, (str, Path)):  # a lone path, not a sequence of characters
        config_paths = [config_paths]
    merged: Sections = {}
    for spec in config_paths:
        _merge_into(merged, _load_file(resolve_config_path(spec), chain=()))
    for text in overrides:
        _merge_into(merged, _parse_override(text))
    return _build(merged)


def config_to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain nested dict of every section; `derived` only once validation has filled it."""
    data = dataclasses.asdict(cfg)
    if data.get("derived") is None:
        data.pop("derived", None)
    return data


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> JobConfig:
    """Inverse of `config_to_dict`, with the same key and type checks as files."""
    data = dict(data)
    derived = data.pop("derived", None)
    cfg = _build(_check_sections(data, source))
    if derived is not None:
        try:
            cfg.derived = DerivedConfig(**derived)
        except TypeError as e:
            raise ConfigError(f"{source}: bad 'derived' section: {e}") from None
    return cfg


def save_config(cfg: JobConfig, path: str | Path) -> Path:
    """Write `cfg` as YAML that `load_config` reads back to an equal config. Derived values go into
    a comment: they are recomputed by `validate()` and cannot be set. The write is atomic."""
    path = Path(path)
    data = config_to_dict(cfg)
    derived = data.pop("derived", None)
    text = yaml.safe_dump(data, sort_keys=False)
    if derived:
        lines = "".join(f"#   {key}: {value}\n" for key, value in derived.items())
        text = f"# derived by validate() (recomputed on load, not read back):\n{lines}{text}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def list_presets(include_fragments: bool = False) -> list[str]:
    """Preset names; names starting with `_` are shared fragments meant only as `base:` layers."""
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    return names if include_fragments else [n for n in names if not n.startswith("_")]


def resolve_config_path(spec: str | Path, relative_to: Path | None = None) -> Path:
    """A file path (relative to `relative_to` when given, else the working directory) or a preset name."""
    path = Path(spec)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path.resolve()
    name = str(spec)
    preset = PRESETS_DIR / f"{name}.yaml"
    if re.fullmatch(r"[\w.-]+", name) and preset.is_file():
        return preset.resolve()
    presets = list_presets(include_fragments=True)
    close = difflib.get_close_matches(name, presets, n=1)
    hint = f" Did you mean preset '{close[0]}'?" if close else ""
    raise ConfigError(
        f"config {name!r} is neither a file ({path}) nor a preset.{hint} Presets: {', '.join(presets)}"
    )


# ---- files and layering ------------------------------------------------------------------------


def _load_file(path: Path, chain: tuple[Path, ...]) -> Sections:
    if path in chain:
        raise ConfigError("config include cycle: " + " -> ".join(str(p) for p in (*chain, path)))
    raw = _read_yaml(path)
    bases = raw.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a list of preset names or relative paths")
    merged: Sections = {}
    for base in bases:
        _merge_into(merged, _load_file(resolve_config_path(base, path.parent), (*chain, path)))
    _merge_into(merged, _check_sections(raw, source=str(path)))
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:  # an empty file is an empty layer
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model:, data:, ...), "
            f"got {type(data).__name__}"
        )
    return data


def _merge_into(merged: Sections, layer: Sections) -> None:
    """A later layer replaces whole keys (a mapping too), except an override of one mapping entry
    (`optimizer.lr_multipliers.backbone=0.1`, the key "lr_multipliers.backbone"), which is merged
    into the mapping so far."""
    for section, values in layer.items():
        target = merged.setdefault(section, {})
        for key, value in values.items():
            name, _, entry = key.partition(".")
            if entry:
                target[name] = {**target.get(name, _default(section, name)), entry: value}
            else:
                target[key] = value


def _default(section: str, name: str) -> Any:
    field = next(f for f in dataclasses.fields(_SECTION_TYPES[section]) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _build(sections: Sections) -> JobConfig:
    return JobConfig(**{name: cls(**sections.get(name, {})) for name, cls in _SECTION_TYPES.items()})


# ---- key and type checks -----------------------------------------------------------------------


def _check_sections(raw: Mapping[str, Any], source: str) -> Sections:
    checked: Sections = {}
    for section, values in raw.items():
        section = str(section)
        _check_section_name(section, source)
        values = {} if values is None else values  # `model:` with nothing under it
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys, got {values!r}")
        checked[section] = {}
        for key, value in values.items():
            tp = _field_type(section, str(key), source)
            checked[section][str(key)] = _check_type(f"{section}.{key}", value, tp, source)
    return checked


def _check_section_name(section: str, source: str) -> None:
    if section == "derived":
        raise ConfigError(f"{source}: 'derived' is computed by validate() and cannot be set")
    if section == "base":
        raise ConfigError(f"{source}: 'base' is only allowed at the top level of a YAML file")
    if section not in _SECTION_TYPES:
        raise ConfigError(_unknown(source, "section", section, section, list(_SECTION_TYPES), ""))


def _field_type(section: str, key: str, source: str) -> Any:
    fields = _FIELD_TYPES[section]
    if key not in fields:
        raise ConfigError(_unknown(source, "key", f"{section}.{key}", key, list(fields), f"{section}."))
    return fields[key]


def _unknown(source: str, kind: str, dotted: str, given: str, allowed: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(given, allowed, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    where = f" in '{prefix[:-1]}'" if prefix else ""
    return f"{source}: unknown {kind} '{dotted}'.{hint} Allowed {kind}s{where}: {', '.join(allowed)}"


def _check_type(dotted: str, value: Any, tp: Any, source: str) -> Any:
    if typing.get_origin(tp) is dict:  # dict[str, float]: a mapping, each entry checked by its key
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{source}: {dotted} expects a mapping of names to values, e.g. "
                              f"{{backbone: 0.1}}, got {value!r}")
        value_type = typing.get_args(tp)[1]
        return {k: _check_type(f"{dotted}.{k}", v, value_type, source) for k, v in value.items()}
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{source}: {dotted} must be one of {choices}, got {value!r}")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp in (int, float):  # bool is an int subclass in Python; a YAML `true` is never a size
        ok = isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        quote = " (quote it in YAML)" if tp is str else ""
        raise ConfigError(
            f"{source}: {dotted} expects {tp.__name__}{quote}, got {type(value).__name__} {value!r}"
        )
    return float(value) if tp is float else value


def _parse_override(text: str) -> Sections:
    source = f"override {text!r}"
    key, sep, raw_value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"{source}: expected section.key=value, e.g. model.hidden_size=512")
    _check_section_name(section, source)
    name, _, entry = name.partition(".")  # optimizer.lr_multipliers.backbone=0.1: one mapping entry
    tp = _field_type(section, name, source)
    if entry:
        if typing.get_origin(tp) is not dict:
            raise ConfigError(f"{source}: {section}.{name} is not a mapping, so it has no entry {entry!r}")
        tp, name = typing.get_args(tp)[1], f"{name}.{entry}"
    if _is_text(tp) and raw_value[:1] not in ("'", '"'):
        value: Any = raw_value  # paths and names stay verbatim: `data.tokenizer=1e-3` is a string
    else:
        try:
            value = yaml.load(raw_value, Loader=_YamlLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: cannot parse the value as YAML: {e}") from None
    return {section: {name: _check_type(f"{section}.{name}", value, tp, source)}}


def _is_text(tp: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"hidden_size": 512}} -> {"model.hidden_size": 512}: dotted keys, for diffs."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
