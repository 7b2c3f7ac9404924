"""Declarative value rules for config fields: `field(default=..., metadata=gt(0))`, checked by one walker."""
from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass

from ..errors import ConfigError


class FieldError(ConfigError):
    """A value outside its field's range: `key` lets load_config name the YAML line that set it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """lo <= v (lo < v when lo_open), v <= hi (v < hi when hi_open); None: unbounded. A list is checked
    element by element (its keys are KEY.0, KEY.1, ...)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                f"{')' if self.hi_open else ']'}")

    def holds(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def check(self, key: str, value) -> None:
        for k, v in ([(f"{key}.{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]):
            if not self.holds(v):
                raise FieldError(k, f"{k} must be {self}, got {v!r}")


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def check(self, key: str, value) -> None:
        if value not in self.choices:
            raise FieldError(key, f"{key} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")


class NonEmpty:
    def check(self, key: str, value) -> None:
        if not value:
            raise FieldError(key, f"{key} must not be empty")


def ge(lo) -> dict:
    return {"checks": (Range(lo),)}


def gt(lo) -> dict:
    return {"checks": (Range(lo, lo_open=True),)}


def within(lo, hi, hi_open: bool = False) -> dict:
    return {"checks": (Range(lo, hi, hi_open=hi_open),)}


def one_of(*choices) -> dict:
    return {"checks": (OneOf(choices),)}


def nonempty() -> dict:
    return {"checks": (NonEmpty(),)}


def check_fields(obj, prefix: str = "") -> None:
    """Every field's metadata rules, in nested dataclasses, lists of them and mappings of them."""
    for f in fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        for rule in f.metadata.get("checks", ()):
            rule.check(key, value)
        if is_dataclass(value):
            check_fields(value, f"{key}.")
        elif isinstance(value, (list, dict)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if is_dataclass(v):
                    check_fields(v, f"{key}.{k}.")


