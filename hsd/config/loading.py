"""YAML files (with their `base:` chains) and key=value overrides onto the schema, every error naming its file,
line and key; then the rules of the fields, of the run as a whole and of its world."""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from ..io import atomic_path
from .rules import FieldError
from .schema import Run
from .validate import validate


@dataclass
class _Layer:
    """One YAML file's keys, with its parsed node tree for the line of a key."""
    path: Path
    data: dict
    node: yaml.Node | None

    def where(self, parts: tuple[str, ...] | list[str] = ()) -> str:
        line = _line(self.node, parts)
        return f"{self.path}:{line}" if line else str(self.path)


def load_config(paths: list[str] = (), overrides: list[str] = (), inputs: bool = True) -> Run:
    """Defaults <- each YAML (after its `base:` chain) <- key=value overrides; returns a typed Run. inputs=False:
    the world's input files (model.path, the data) are not asked for (a command that reads none of them)."""
    cfg, origins = OmegaConf.structured(Run), {}  # origins: dotted key -> the YAML line that last set it
    for p in paths:
        for layer in _yaml_chain(Path(p)):
            _check(Run, layer.data, layer)
            cfg = _merge(cfg, layer)
            for parts, t, *_ in _leaves(Run, layer.data):  # a list is replaced whole: forget its old entries
                if typing.get_origin(t) is list or any(p.isdigit() for p in parts):
                    key = ".".join(parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))])
                    origins = _forget(origins, key)
            origins.update({".".join(parts): layer.where(parts) for parts, *_ in _leaves(Run, layer.data)})
    for item in overrides:
        cfg = _override(cfg, item)
        origins = _forget(origins, item.split("=", 1)[0])
    run = OmegaConf.to_object(cfg)
    try:
        validate(run, inputs)
    except FieldError as e:
        parts = e.key.split(".")
        where = next((origins[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in origins),
                     None)
        if where is None:
            raise
        raise FieldError(e.key, f"{where}: {e}") from None
    return run


def _forget(origins: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in origins.items() if k != key and not k.startswith(key + ".")}


def config_yaml(run: Run) -> str:
    """The whole resolved config as YAML: what a run folder's config.yaml holds."""
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def save_config(run: Run, path: Path) -> None:
    with atomic_path(path) as tmp:  # a run folder never holds a torn config.yaml
        Path(tmp).write_text(config_yaml(run))


def _yaml_chain(path: Path, named_by: _Layer | None = None) -> list[_Layer]:
    expected = (f"named by base: in {named_by.where(['base'])}" if named_by
                else "expected a YAML file of config keys, e.g. experiments/lab/tscd.yaml")
    if not path.exists():
        raise ConfigError(f"config file not found: {path} ({expected})")
    if not path.is_file():
        raise ConfigError(f"config file {path} is {'a folder' if path.is_dir() else 'not a regular file'} ({expected})")
    try:
        text = path.read_text(encoding="utf-8")
        node, data = yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start}); {expected}") from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = (f"; {e.context} at line {e.context_mark.line + 1}"
                   if e.context and e.context_mark and e.problem_mark else "")
        raise ConfigError(f"{path}:{mark.line + 1}: YAML syntax error: {e.problem or e.context} "
                          f"(column {mark.column + 1}{context})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {str(e).splitlines()[0]}") from e
    layer = _Layer(path, data if data is not None else {}, node)
    if not isinstance(layer.data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    base = layer.data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{layer.where(['base'])}: base must be the path of a YAML file, got {base!r}")
    return (_yaml_chain(path.parent / base, layer) if base else []) + [layer]


def _line(node: yaml.Node | None, parts) -> int | None:
    """1-based line of the dotted key `parts` in a composed YAML (the deepest part found), None if none is."""
    line = None
    for part in parts:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)),
                       None)
            if hit is None:
                return line
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _unknown(key: str, known: list[str], prefix: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{prefix}{key}' in {where}{hint}")


def _check(cls, data: dict, layer: _Layer, parts: tuple[str, ...] = ()) -> None:
    """Unknown keys of a YAML layer, in nested sections, lists of sections and mappings of sections."""
    hints = typing.get_type_hints(cls)
    prefix = "".join(f"{p}." for p in parts)
    for key, value in data.items():
        here = (*parts, str(key))
        if key not in hints:
            raise _unknown(str(key), [f.name for f in fields(cls)], prefix, layer.where(here))
        t = hints[key]
        origin, args = typing.get_origin(t), typing.get_args(t)
        if is_dataclass(t) and isinstance(value, dict):
            _check(t, value, layer, here)
        elif origin is list and is_dataclass(args[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"{layer.where((*here, str(i)))}: '{prefix}{key}.{i}' must be a mapping")
                _check(args[0], item, layer, (*here, str(i)))
        elif origin is dict and is_dataclass(args[1]) and isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, dict):
                    _check(args[1], item, layer, (*here, str(name)))


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if is_dataclass(t):
        return f"a mapping of {t.__name__} keys ({', '.join(f.name for f in fields(t))})"
    if origin is list:
        return f"a list of {_plural(_type_name(args[0]))}"
    if origin is dict:
        return f"a mapping of names to {_plural(_type_name(args[1]))}"
    return {int: "an integer", float: "a number", bool: "a boolean (true or false)", str: "a string"}.get(
        t, f"a {getattr(t, '__name__', t)}")


def _plural(name: str) -> str:
    """"a mapping of X keys (..)" -> "mappings of X keys (..)", "an integer" -> "integers"."""
    head, _, tail = name.split(" ", 1)[1].partition(" ")
    return f"{head}s {tail}".strip()


def _leaves(t, value, parts: tuple[str, ...] = (), wrap=lambda v: v):
    """(dotted key parts, type, value, the value nested as a one-leaf layer) for each leaf of a YAML layer."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if is_dataclass(t) and isinstance(value, dict):
        hints = typing.get_type_hints(t)
        for k, v in value.items():
            if k in hints:
                yield from _leaves(hints[k], v, (*parts, str(k)), lambda x, k=k, w=wrap: w({k: x}))
    elif origin is list and is_dataclass(args[0]) and isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(args[0], v, (*parts, str(i)), lambda x, w=wrap: w([x]))
    elif origin is dict and is_dataclass(args[1]) and isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(args[1], v, (*parts, str(k)), lambda x, k=k, w=wrap: w({k: x}))
    else:
        yield parts, t, value, wrap(value)


def _merge(cfg, layer: _Layer):
    """Merge one YAML layer; a value of the wrong type is named by file, line and key."""
    try:
        return OmegaConf.merge(cfg, layer.data)
    except OmegaConfBaseException as e:
        for parts, t, value, alone in _leaves(Run, layer.data):  # find the culprit: merge leaf by leaf
            try:
                OmegaConf.merge(cfg, alone)
            except OmegaConfBaseException:
                raise ConfigError(f"{layer.where(parts)}: {'.'.join(parts)} must be {_type_name(t)}, "
                                  f"got {value!r}") from e
        raise ConfigError(f"{layer.path}: {str(e).splitlines()[0]}") from e


def _override(cfg, item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. tscd.lr=1e-4)")
    key, text = item.split("=", 1)
    t = _check_path(Run, key.split("."), item)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {text!r} is not a YAML value "
                          f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from e
    absent = _absent_entry(cfg, key.split("."))
    if absent:
        raise ConfigError(f"override {item!r}: {absent}")
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException as e:
        if t is not None:  # a wrong type for a key that exists
            raise ConfigError(f"override {item!r}: {key} must be {_type_name(t)}, got {value!r}") from e
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from e
    return cfg


def _absent_entry(cfg, parts: list[str]) -> str | None:
    """Why `parts` names a list item or mapping entry that is not there (None if it is): such an entry is set whole."""
    node = cfg
    for i, part in enumerate(parts[:-1]):
        node = node[int(part)] if OmegaConf.is_list(node) else node.get(part)
        child = parts[i + 1]
        if OmegaConf.is_list(node) and child.isdigit() and int(child) >= len(node):
            where = ".".join(parts[:i + 1])
            return (f"{where} has {len(node)} entries (0..{len(node) - 1}); set the whole list to change their "
                    f"number, e.g. {where}=[...]")
        if OmegaConf.is_dict(node) and not OmegaConf.is_config(node.get(child)) and i + 2 < len(parts) \
                and child not in node:
            where = ".".join(parts[:i + 1])
            return (f"{where} has no entry {child!r}; set a new mapping entry whole, e.g. "
                    f"feedback.rewards={{Aes: {{margin: 7, weight: 1}}}}")
    return None


def _check_path(cls, parts: list[str], where: str, prefix: str = ""):
    """Refuse an unknown override key; return its type (None for a whole mapping entry's free keys)."""
    hints = typing.get_type_hints(cls)
    if parts[0] not in hints:
        raise _unknown(parts[0], [f.name for f in fields(cls)], prefix, f"override '{where}'")
    t, rest = hints[parts[0]], parts[1:]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if rest and origin is list and rest[0].isdigit():
        t, rest, prefix = args[0], rest[1:], f"{prefix}{parts[0]}.{rest[0]}."
    elif rest and origin is dict and is_dataclass(args[1]) and len(rest) > 1:
        t, rest, prefix = args[1], rest[1:], f"{prefix}{parts[0]}.{rest[0]}."
    elif rest and origin is dict:
        return None
    else:
        prefix = f"{prefix}{parts[0]}."
    if rest and is_dataclass(t):
        return _check_path(t, rest, where, prefix)
    return None if rest else t


