"""Typed options: one dataclass field per command-line flag, carrying its type, default, help, range, choices and
aliases. A script's argparse parser, the checks on its YAML preset and its config.json all come from these fields,
so a value typed on the command line and the same value in a preset pass exactly the same checks.

    @dataclass
    class OptimConfig:
        learning_rate: float = option(1e-4, "AdamW peak learning rate", low=0, low_open=True, aliases=("--lr",))

* :func:`add_options` adds a (possibly nested) config dataclass to a parser, one argument group per nested
  dataclass; flags are the leaf field names (unique within one config), plus their aliases.
* :func:`coerce` converts and checks one value (a command-line string or a YAML value): ints must be integers (not
  4.7, not true), floats finite, bools real booleans, lists comma lists or YAML lists, numbers within their range.
* :func:`build` turns the parsed flat values back into the nested dataclass; ``__post_init__`` of each dataclass
  checks what involves several fields and raises ``ValueError``.
* :func:`flat` is the inverse: ``{flag name: value}``, what config.json records and a resumed run is compared on.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Sequence

_META = "busdiff_option"


@dataclasses.dataclass(frozen=True)
class Spec:
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    nullable: bool = False
    finite: bool = True
    nargs: str | None = None


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           aliases: Sequence[str] = (), metavar: str | None = None, nullable: bool = False, finite: bool = True,
           nargs: str | None = None) -> Any:
    """A dataclass field that is also a flag (see the module docstring). List defaults are copied per instance.
    ``nargs="+"`` (lists only): the flag takes space-separated values (``--test_data A B``) instead of a comma list."""
    spec = Spec(help, tuple(choices) if choices is not None else None, low, high, low_open, high_open,
                tuple(aliases), metavar, nullable, finite, nargs)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=tuple(default): list(d), metadata={_META: spec})
    return dataclasses.field(default=default, metadata={_META: spec})


class OptionError(ValueError):
    """A value that breaks its option's rule; the message says what was expected."""


def _base_type(tp) -> tuple[Any, bool]:
    """(the type, whether None is allowed) from an annotation such as ``int``, ``float | None``, ``list[int]``."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def leaf_fields(cls) -> list[tuple[str, Any, Spec, tuple[str, ...]]]:
    """(name, type, spec, path of nested dataclass fields) for every option of ``cls``, depth first."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += [(n, t, s, (f.name, *p)) for n, t, s, p in leaf_fields(tp)]
        elif _META in f.metadata:
            out.append((f.name, tp, f.metadata[_META], ()))
    return out


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range_text(spec: Spec) -> str:
    parts = []
    if spec.low is not None:
        parts.append(f"{'>' if spec.low_open else '>='} {_num(spec.low)}")
    if spec.high is not None:
        parts.append(f"{'<' if spec.high_open else '<='} {_num(spec.high)}")
    return " and ".join(parts)


def _check_number(value, spec: Spec, kind: str):
    if kind == "float" and spec.finite and not math.isfinite(value):
        raise OptionError(f"must be a finite number, got {value}")
    bad = ((spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)) or
           (spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high)))
    if bad:
        raise OptionError(f"must be {_range_text(spec)}, got {value:g}" if kind == "float" else
                          f"must be {_range_text(spec)}, got {value}")
    return value


def _scalar(value, tp, spec: Spec):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise OptionError(f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or isinstance(value, float) or not isinstance(value, (int, str)):
            raise OptionError(f"must be an integer, got {value!r}")
        try:
            value = int(value)
        except ValueError:
            raise OptionError(f"must be an integer, got {value!r}") from None
        return _check_number(value, spec, "int")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise OptionError(f"must be a number, got {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise OptionError(f"must be a number, got {value!r}") from None
        return _check_number(value, spec, "float")
    if tp is str:
        if not isinstance(value, str):
            raise OptionError(f"must be a string, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise OptionError(f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
        return value
    raise TypeError(f"unsupported option type {tp}")


def coerce(value, tp, spec: Spec):
    """``value`` (a command-line string or a YAML value) as type ``tp``, checked against ``spec``."""
    tp, nullable = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() == "none" and (nullable or spec.nullable)):
        if nullable or spec.nullable:
            return None
        raise OptionError("must be given (null is not allowed)")
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise OptionError(f"must be a comma list, got {value!r}")
        try:
            return [_scalar(v, inner, spec) for v in items]
        except OptionError as exc:
            raise OptionError(f"every entry {exc}") from None
    return _scalar(value, tp, spec)


def add_options(parser: argparse.ArgumentParser, cls, group_titles: dict[str, str] | None = None) -> None:
    """Add every option of the config dataclass ``cls`` to ``parser`` (one group per nested dataclass)."""
    groups: dict[tuple, Any] = {}
    defaults = flat(cls())
    for name, tp, spec, path in leaf_fields(cls):
        key = path[:1]
        if key not in groups:
            title = (group_titles or {}).get(key[0] if key else "", key[0] if key else "options")
            groups[key] = parser.add_argument_group(title)
        g = groups[key]
        flags = [f"--{name}", *spec.aliases]
        rng = _range_text(spec)
        help_text = spec.help + (f" ({rng})" if rng and "%" not in rng else "")
        base, _ = _base_type(tp)
        if base is bool:
            g.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=defaults[name],
                           help=help_text)
            continue

        def convert(text, tp=tp, spec=spec):
            try:
                return coerce(text, tp, spec)
            except OptionError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        if spec.nargs and typing.get_origin(base) is list:
            (inner,) = typing.get_args(base)

            def convert_item(text, inner=inner, spec=spec):   # one list element per token
                try:
                    return _scalar(text, inner, spec)
                except OptionError as exc:
                    raise argparse.ArgumentTypeError(str(exc)) from None
            g.add_argument(*flags, dest=name, type=convert_item, default=defaults[name], nargs=spec.nargs,
                           help=help_text.replace("%", "%%"), metavar=spec.metavar or "VALUE")
            continue
        convert.__name__ = getattr(base, "__name__", "value")
        metavar = spec.metavar or ("{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else name.upper())
        g.add_argument(*flags, dest=name, type=convert, default=defaults[name], help=help_text.replace("%", "%%"),
                       metavar=metavar)


def option_specs(cls) -> dict[str, tuple[Any, Spec]]:
    """{flag name: (type, spec)} of every option of ``cls``, aliases included (without the leading dashes)."""
    out = {}
    for name, tp, spec, _ in leaf_fields(cls):
        out[name] = (tp, spec)
        for a in spec.aliases:
            out[a.lstrip("-")] = (tp, spec)
    return out


def canonical_names(cls) -> dict[str, str]:
    """{flag name or alias: the option's canonical name}."""
    out = {}
    for name, _, spec, _ in leaf_fields(cls):
        out[name] = name
        for a in spec.aliases:
            out[a.lstrip("-")] = name
    return out


def build(cls, values: dict[str, Any]):
    """The nested config dataclass ``cls`` from flat ``{option name: value}`` (missing names keep defaults).
    Cross-field problems raise ValueError from the dataclasses' ``__post_init__``."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def flat(cfg) -> dict[str, Any]:
    """``{option name: value}`` of a (nested) config dataclass instance."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat(v))
        elif _META in f.metadata:
            out[f.name] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def bounded(kind, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False):
    """An argparse ``type=`` for a plain flag with the same checks as :func:`option` (e.g. ``bounded(float, 0)``)."""
    spec = Spec("", low=low, high=high, low_open=low_open, high_open=high_open)

    def convert(text):
        try:
            return coerce(text, kind, spec)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = kind.__name__
    return convert
