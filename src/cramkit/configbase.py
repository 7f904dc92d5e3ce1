"""Typed dataclass configs: strict loading from dicts, ``key=value`` overrides, "did you mean".

Every config in cramkit is a dataclass deriving from :class:`Config`. Field docstrings are kept in
``metadata={"help": ...}`` so the CLI can print them. Loading is strict: unknown keys and values of
the wrong type raise :class:`~cramkit.errors.ConfigError` naming the dotted path. Text, as
``key=value`` overrides give every value, is read as the field's type (``"0.5"`` as a number);
values that come typed, from TOML or JSON, must have that type already (:func:`check_types`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError, UnknownKey

T = TypeVar("T", bound="Config")


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field that carries its help text for the CLI."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def did_you_mean(name: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """A " (did you mean 'x'?)" hint (``prefix`` before x), or an empty string when nothing is close."""
    # Case aside: `techniques=[PLD]` or `norm=RMSNorm` are the names in another case.
    by_lower = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{by_lower[close[0]]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: Seeds lie in [0, SEED_LIMIT): numpy's generators refuse a negative seed and torch.manual_seed
#: one beyond 64 bits, and a run adds a rank offset to its seed (both failed as tracebacks once
#: the run had started).
SEED_LIMIT = 2**63


def check_seed(name: str, value: int) -> None:
    """Raise ConfigError unless ``value`` is a seed every generator cramkit seeds accepts."""
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name} must be in [0, 2**63), got {value}")


#: A field whose value is a registered name (``model.norm``, ``model.positions``): a string, for
#: which ``key=none`` means the variant called "none" rather than no value.
Name = typing.NewType("Name", str)


def coerce(value: Any, tp: Any, path: str, *, strict: bool = False) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ConfigError that names ``path``.

    By default values may be text, as ``key=value`` overrides give them: ``"0.5"`` is a number,
    ``"yes"`` true, ``"a,b"`` a list and None (``key=none``) the name "none". ``strict`` is for
    values that come with types of their own (a TOML file, a config.json): each must be of
    ``tp`` already, an int standing for a float being the one conversion.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path, strict=strict)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(tp)}{_typed_hint(value, tp, strict)}")
    if origin is Literal:
        choices = get_args(tp)
        if value is None and "none" in choices and not strict:  # `key=none` on the command line parses to None
            return "none"
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) and not strict:
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}{_typed_hint(value, tp, strict)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{path}[{i}]", strict=strict) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{path}[{i}]", strict=strict) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table/dict, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table of {tp.__name__} options, got {value!r}")
        if strict:
            check_types(tp, value, path)
        return tp.from_dict(value, path=path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{path}: expected true/false, got {value!r}{_typed_hint(value, tp, strict)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        # Strict, 32.0 is refused too: TOML and cramkit's JSON write whole numbers as integers,
        # so a float here was written as one, and taking 32.0 but not 32.5 would make a float
        # for a count an error by chance.
        if not strict and isinstance(value, float) and value.is_integer():
            return int(value)
        if not strict and isinstance(value, str):
            try:
                return int(float(value)) if value.strip().lower().count("e") else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}{_typed_hint(value, tp, strict)}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str) and not strict:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{path}: expected a number, got {value!r}{_typed_hint(value, tp, strict)}")
        # `lr=nan` parses as a float, but NaN slips past every range check (all comparisons are
        # false) and infinity is no setting of any field: both would only fail deep in training.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return number
    if tp is Name:
        if value is None and not strict:  # `key=none` on the command line parses to None; as a name it is "none"
            return "none"
        tp = str
    if tp is str:
        if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}{_typed_hint(value, tp, strict)}")
        return value
    return value


def _typed_hint(value: Any, tp: Any, strict: bool) -> str:
    """For a value refused by a strict :func:`coerce`: " (write 0.5)", the value as the file
    should have it, where a ``key=value`` override would have read it so; else ""."""
    if not strict:
        return ""
    try:
        typed = coerce(value, tp, "")
    except ConfigError:
        return ""
    return f" (write {json.dumps(_plain(typed))})"


def check_types(cls: type[Config], data: dict[str, Any], path: str = "") -> None:
    """Raise ConfigError for a value of ``data``, a table of ``cls``'s options, that is not of
    its field's type, as a strict :func:`coerce` sees it.

    Nothing is built or validated, and missing fields are no error, so that one layer of a
    config (a base recipe, say) can be checked before the others are merged over it. Unknown
    keys are left to :meth:`Config.from_dict`, which names them with a hint.
    """
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in names:
            continue
        tp, full = hints[key], f"{path}.{key}" if path else key
        if isinstance(tp, type) and issubclass(tp, Config) and isinstance(value, dict):
            check_types(tp, value, full)  # not coerce: that would build and validate a part
        else:
            coerce(value, tp, full, strict=True)


def _under(path: str, message: str, fields: list[str]) -> str:
    """``message`` from a section's ``validate`` with the section's dotted path in front, so that
    ``norm: unknown norm`` reads ``model.norm: ...`` (sections are validated without knowing it)."""
    root = path.split(".")[0]
    if not path or re.match(rf"{re.escape(root)}\b", message):  # named already ("optim.lr ...")
        return message
    # "norm: unknown ..." names one field; "min_chars, max_docs and ..." several: the section then.
    first = re.match(r"(\w+)(,?)", message)
    one = first is not None and first.group(1) in fields and not first.group(2)
    return f"{path}.{message}" if one else f"{path}: {message}"


def _sections(cls: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted path, config class) of every section below ``cls``, nested ones included."""
    for name, tp in get_type_hints(cls).items():
        if isinstance(tp, type) and issubclass(tp, Config):
            path = f"{prefix}{name}"
            yield path, tp
            yield from _sections(tp, f"{path}.")


@dataclasses.dataclass
class Config:
    """Base of every cramkit config: strict ``from_dict``, ``to_dict`` and a ``validate`` hook."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
        """Build from a (possibly partial) dict; unknown keys are errors with a hint."""
        if data is not None and not isinstance(data, dict):  # e.g. a damaged config.json
            raise ConfigError(f"{path or cls.__name__}: expected a table of options, got {type(data).__name__}")
        data = dict(data or {})
        hints = get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        kwargs = {}
        for key, value in data.items():
            if not isinstance(key, str):  # a dict built in Python: did_you_mean's .lower() failed on it
                raise UnknownKey(f"{path or cls.__name__}: option names are strings, got {key!r}", str(key))
            full = f"{path}.{key}" if path else key
            if key not in names:
                hint = (cls._quoted_dotted(key, path) or did_you_mean(key, names, f"{path}." if path else "")
                        or cls._in_a_section(key, hints, path))
                raise UnknownKey(f"unknown config key '{full}'{hint}", full)
            try:
                kwargs[key] = coerce(value, hints[key], full)
            except UnknownKey as exc:
                if path or "(did you mean" in str(exc):
                    raise
                raise UnknownKey(f"{exc}{cls._in_another_section(exc.key)}", exc.key) from None
        try:
            obj = cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{path or cls.__name__}: {exc}") from None
        try:
            obj.validate()
        except ConfigError as exc:  # its kind kept (UnknownName): a reader may pass over that one
            error = type(exc)(_under(path, str(exc), names))
            if isinstance(exc, UnknownKey):  # its dotted key: load_config names the recipe that set it
                error.key = exc.key
            raise error from None
        return obj

    @classmethod
    def _quoted_dotted(cls, key: str, path: str) -> str:
        # TOML's `"train.budget" = "2h"` is one key whose name holds a dot, which the error showed
        # as 'train.budget', a key that exists: say why it is not that one.
        section, _, name = key.rpartition(".")
        sections = dict(_sections(cls))
        if not section or section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
            return ""
        full = f"{path}.{section}" if path else section
        return (f" (a quoted key is one name, dots and all: write {key} = ... without quotes, or {name} = ... "
                f"under [{full}])")

    @classmethod
    def _in_a_section(cls, key: str, hints: dict[str, Any], path: str) -> str:
        # `hidden=32` at the top level: the user meant the section's field, `model.hidden`.
        homes = [name for name, tp in hints.items()
                 if isinstance(tp, type) and issubclass(tp, Config) and key in {f.name for f in dataclasses.fields(tp)}]
        if not homes:
            return ""
        prefix = f"{path}." if path else ""
        return f" (did you mean {' or '.join(repr(prefix + h + '.' + key) for h in homes)}?)"

    @classmethod
    def _in_another_section(cls, dotted: str) -> str:
        # `train.lr=...`: the field exists, in another section (`optim.lr`); a misspelt name
        # within the section was hinted already, so only an exact name elsewhere is offered.
        section, _, name = dotted.rpartition(".")
        sections = dict(_sections(cls))
        # A top-level setting too (`train.seed` -> `seed`, the run's, before data.prepare's).
        homes = [name] if name in {f.name for f in dataclasses.fields(cls)} and name not in sections else []
        homes += [f"{prefix}.{name}" for prefix, tp in sections.items()
                  if prefix != section and name in {f.name for f in dataclasses.fields(tp)}]
        return f" (did you mean {' or '.join(map(repr, homes))}?)" if homes else ""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with some fields changed."""
        obj = dataclasses.replace(self, **changes)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Raise ConfigError for invalid combinations; subclasses extend this."""

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value``: numbers, booleans, lists, else a string.

    ``[pld,vcycle]`` is a list of strings; ``1e-3`` is a float; ``true`` a bool; ``none`` is None.
    """
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [parse_value(part) for part in _split_top(inner)] if inner else []
    try:
        return ast.literal_eval(s) if s[:1].isdigit() or s[:1] in "-+." else _string(s)
    except (ValueError, SyntaxError):
        return _string(s)


def _string(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (p.strip() for p in parts) if p]


def _shell_split_list(overrides: typing.Sequence[str], i: int) -> str | None:
    """The whole ``key=[a,b,...]`` when the shell split it at spaces and ``overrides[i]`` is its
    second piece (the first piece without ``=`` is reported); None otherwise."""
    head = overrides[i - 1] if i else ""
    if "=" not in head or head.count("[") <= head.count("]"):
        return None
    end = i
    while end + 1 < len(overrides) and "=" not in overrides[end + 1]:
        joined = "".join(overrides[i - 1 : end + 1])
        if joined.count("[") <= joined.count("]"):
            break
        end += 1
    whole = "".join(overrides[i - 1 : end + 1])
    return whole + "]" * (whole.count("[") - whole.count("]"))  # a list the user never closed


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in a copy) and return it."""
    import copy

    out = copy.deepcopy(data)
    for i, item in enumerate(overrides):
        if "=" not in item:
            whole = _shell_split_list(overrides, i)
            if whole is not None:
                raise ConfigError(f"override '{item}' is not of the form key=value: write lists "
                                  f"without spaces ({whole}) or quote them")
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        unclosed = value.count("[") - value.count("]")
        # A following piece without '=' is the rest of a list the shell split: reported there.
        if value.lstrip().startswith("[") and unclosed > 0 and "=" in (overrides[i + 1 : i + 2] or ["="])[0]:
            # parse_value would read it as text, and `techniques=[pld` as a technique named '[pld'
            raise ConfigError(f"override '{item}': the list is not closed (write {item}{']' * unclosed})")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = parse_value(value)
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    import copy

    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
