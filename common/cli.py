"""Command-line plumbing shared by every script.

* ``make_parser`` adds the two flags every script has: ``--config`` (a YAML preset whose keys are the
  script's own flags; flags typed on the command line override it) and ``--dry-run`` (print the resolved
  configuration and exit).
* ``parse_config`` resolves flags + preset into one ``argparse.Namespace`` and validates preset keys,
  types and choices exactly as argparse validates typed flags.
* ``run_main`` turns a :class:`UserError` (bad input: missing folder, wrong format, incompatible
  checkpoint, ...) into one clear line on stderr and exit status 2 — never a bare traceback.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from common.errors import EXIT_USER_ERROR, UserError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description/epilog (examples) formatted as written."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``error: <prog>: <what> (see --help)`` and exit status 2, not a usage dump."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def make_parser(description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with ``--config`` and ``--dry-run`` already added."""
    parser = Parser(description=description, epilog=epilog, formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML preset whose keys are this script's flags (without the leading --); "
                             "flags given on the command line override the preset")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the resolved configuration (preset + flags) and exit without doing anything")
    return parser


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{flag name without dashes (every alias too): action}."""
    out = {}
    for a in parser._actions:
        if a.dest in ("help", "config", "dry_run"):
            continue
        out[a.dest] = a
        for opt in a.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[opt[2:]] = a
    return out


def preset_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value for ``action``, through the same conversion and checks as the typed flag."""
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction):   # a repeatable flag: one value or a list of them
        items = value if isinstance(value, list) else [value]
        return [preset_value(argparse.Action([], "x", type=action.type or str, choices=action.choices), v)
                for v in items]
    if action.nargs == 0:   # store_true / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [preset_value(argparse.Action([], "x", type=action.type, choices=action.choices), v) for v in items]
    if action.type is None and action.nargs is None:   # a plain string flag (a path, a name)
        if isinstance(value, (list, dict, bool)):
            raise ValueError(f"must be a string (one value), got {value!r}")
        value = str(value)
    if action.type is not None:
        if isinstance(value, (list, dict)) and getattr(action.type, "__module__", "") != "common.options":
            raise ValueError(f"must be a single value, got {value!r}")
        if isinstance(value, bool) and getattr(action.type, "__module__", "") != "common.options":
            raise ValueError(f"must be a {getattr(action.type, '__name__', 'value')}, got {value!r}")
        if getattr(action.type, "__module__", "") != "common.options" and not isinstance(value, str):
            value = str(value)
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {list(action.choices)}, got {value!r}")
    return value


def load_preset(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML preset and check every key is a flag of ``parser`` with a valid value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a mapping of flag names to values")
    actions = _flag_actions(parser)
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        action = actions.get(name)
        if action is None:
            raise UserError(f"{path}: unknown key '{key}' (not a flag of {parser.prog}; see --help)")
        try:
            value = preset_value(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{path}: bad value for '{key}': {exc}") from None
        resolved[action.dest] = value
    return resolved


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the ``--config`` preset (if any) applied as defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = Parser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_preset(known.config, parser))
    args = parser.parse_args(argv)
    args.command = command_line(parser.prog, argv)
    return args


def command_line(prog: str, argv: Sequence[str]) -> str:
    """The command as the user typed it (shell-quoted), recorded in every output for provenance."""
    return shlex.join(["python", prog, *argv])


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The namespace as a JSON-friendly dict (paths as strings), without the bookkeeping keys."""
    out = {}
    for key, value in vars(args).items():
        if key in ("dry_run", "command"):
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def print_config(args: argparse.Namespace) -> None:
    print(json.dumps(resolved_config(args), indent=2, sort_keys=True))


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main``; a UserError becomes one line on stderr and exit status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind as complete; rerun the same command to resume "
              "where the script supports it", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def options_parser(cls, description: str = "", epilog: str | None = None, groups: dict[str, str] | None = None):
    """A parser with --config, --dry-run and every option of the config dataclass ``cls`` (common.options)."""
    from common.options import add_options
    parser = make_parser(description, epilog)
    add_options(parser, cls, groups)
    return parser


def config_from_flags(cls, argv: Sequence[str]):
    """A ``cls`` config from script-style flags (``--config PRESET`` first, then flags), as the script would build
    it: for code that needs a config without running a script (the benchmarks, tests)."""
    from common.options import build
    args = parse_config(options_parser(cls), list(argv))
    try:
        return build(cls, vars(args))
    except ValueError as exc:
        raise UserError(f"configuration: {exc}") from None
