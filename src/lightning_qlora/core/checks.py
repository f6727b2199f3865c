"""Config rules, each written once and read two ways.

A config dataclass (``QuantConfig``, ``AdapterConfig``, ``OptimizerConfig``...) lists its rules in
``CHECKS``. Its constructor raises on the ones broken (the Python API), and the run config check
(``lightning_qlora.app.config``) asks :meth:`Checked.problems` for all of them at once, each named
by its config key (``adapter.r=0 should be ...``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

KeyOf = Callable[[str], str]


@dataclass(frozen=True)
class Check:
    """One field's rule: ``ok(value)``, or the value should be ``expected``.

    Args:
        field: The field it rules.
        ok: Whether a value is fine; it never raises (types are part of the rule).
        expected: What the value should be, e.g. ``"a positive integer"``.
        example: A good value to suggest, e.g. ``"16"``.
        python: The Python API's message, if not the usual one: a template with ``{name}`` and
            ``{value}`` (kept where callers and tests already know the wording).
    """

    field: str
    ok: Callable[[Any], bool]
    expected: str
    example: str = ""
    python: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return (self.field,)

    def for_config(self, values: Mapping[str, Any], key: KeyOf) -> str:
        text = f"{key(self.field)}={values[self.field]!r} should be {self.expected}"
        return text + (f", e.g. {self.example}" if self.example else "")

    def for_python(self, values: Mapping[str, Any]) -> str:
        name, value = self.field, values[self.field]
        if self.python:
            return self.python.format(name=name, value=value)
        text = f"{name} should be {self.expected}, but got {name}={value!r}"
        return text + (f"; try {name}={self.example}." if self.example else ".")


@dataclass(frozen=True)
class Combo:
    """A rule across fields: ``ok(*values)``, in the order of ``names``.

    ``config`` and ``python`` are the two messages, templates naming each field as ``{field}``:
    a config key in the first (``quant.type``), the argument name in the second (``quant_type``).
    """

    names: tuple[str, ...]
    ok: Callable[..., bool]
    config: str
    python: str

    def for_config(self, values: Mapping[str, Any], key: KeyOf) -> str:
        return self.config.format(**{n: key(n) for n in self.names})

    def for_python(self, values: Mapping[str, Any]) -> str:
        return self.python.format(**{n: n for n in self.names})


Rule = Check | Combo


def one_of(field: str, options: Sequence[str], accepts: Callable[[Any], bool] | None = None, verb: str = "is unknown"):
    """A choice among ``options`` (``accepts`` may take more spellings than those shown)."""
    shown = ", ".join(options)
    ok = accepts or (lambda v: isinstance(v, str) and v in options)
    return Check(field, ok, f"one of {shown}", python=f"{{name}}={{value!r}} {verb}; use one of: {shown}.")


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_int(low: int) -> Callable[[Any], bool]:
    """An integer (not a bool) >= ``low``."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(low: float, strict: bool = False, high: float | None = None, closed: bool = False):
    """A number (not a bool) above ``low`` (or equal, unless ``strict``) and below ``high`` (or equal if ``closed``)."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        above = v > low if strict else v >= low
        below = high is None or (v <= high if closed else v < high)
        return above and below

    return ok


def find_problems(rules: Iterable[Rule], values: Mapping[str, Any]) -> list[Rule]:
    """The rules ``values`` break. A field absent from ``values`` is not checked, and a rule
    across fields is skipped once one of them broke its own rule: one mistake, one problem.
    """
    broken: set[str] = set()
    found: list[Rule] = []
    for rule in rules:
        if any(n not in values or n in broken for n in rule.names):
            continue
        if not rule.ok(*(values[n] for n in rule.names)):
            found.append(rule)
            broken.update(rule.names if isinstance(rule, Check) else ())
    return found


def config_problems(rules: Iterable[Rule], values: Mapping[str, Any], key: KeyOf) -> list[str]:
    """The broken rules' messages for a run config, naming each field by ``key(field)``."""
    return [rule.for_config(values, key) for rule in find_problems(rules, values)]


class Checked:
    """Mixin for a frozen config dataclass whose rules are its ``CHECKS``."""

    CHECKS: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def problems(cls, values: Mapping[str, Any], key: KeyOf) -> list[str]:
        """Every rule that ``values`` (by field name; absent ones unchecked) break, named by ``key``."""
        return config_problems(cls.CHECKS, values, key)

    def check(self) -> None:
        """Raise one ``ValueError`` with every rule this instance breaks (called by ``__post_init__``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        messages = [rule.for_python(values) for rule in find_problems(self.CHECKS, values)]
        if messages:
            raise ValueError(" ".join(messages))
