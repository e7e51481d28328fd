"""Typed option schemas: one dataclass per config option, derived from the signature it configures.

A parameter states its type, default and allowed values once, in the class or builder that uses it::

    @option("method", "imp")
    class IMP(PruningSweep):
        def __init__(self, rate: Annotated[float, Range(gt=0, lt=1)] = 0.2, **common): ...

:func:`option` derives ``IMPOptions`` (a dataclass; ``**common`` makes it subclass the base class's schema, here
``PruningOptions``), registers it as ``<group>/<name>_schema`` for :func:`regstory.config.register_configs`, gives
the class the full keyword signature and checks the arguments of every construction. An option's YAML selects its
schema (``defaults: [imp_schema, _self_]``). :func:`check` raises :class:`ConfigError` naming the key and what is
allowed; :func:`regstory.config.check_values` applies it to every schema node of a composed config.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from enum import Enum
from typing import Annotated, Any, Callable, Union, get_args, get_origin

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed interval of a number (each bound optional): ``Range(ge=0, lt=1)`` is [0, 1)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        hi = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if lo and hi:
            return f"in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
        return f"{'<=' if hi[0] == ']' else '<'} {_num(hi[1])}" if hi else "any number"


class OneOf:
    """Allowed values of a string option: ``Annotated[str, OneOf("global", "layerwise")]``."""

    def __init__(self, *values: Any):
        self.values = values

    def __contains__(self, v: Any) -> bool:
        return v in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)

    def __repr__(self) -> str:
        return f"OneOf{self.values!r}"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Marks a dict option held as ``Any`` in the schema (OmegaConf cannot merge a dict into a typed ``None`` node)."""

    optional: bool = False


# -- types: what a value must be, and how to say it -----------------------------------------------------------------
def _split(tp: Any) -> tuple[Any, bool, tuple]:
    """(base type, nullable, markers) of an annotation such as ``Annotated[float | None, Range(gt=0)]``."""
    marks: tuple = ()
    optional = False
    for _ in range(2):  # Annotated[Optional[X]] and Optional[Annotated[X]]
        if get_origin(tp) is Annotated:
            tp, marks = get_args(tp)[0], marks + tuple(get_args(tp)[1:])
        if get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            optional = optional or len(args) < len(get_args(tp))
            tp = args[0] if len(args) == 1 else Any
    return tp, optional, marks


_NOUNS = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings")}


def _fits(tp: Any, v: Any) -> bool:
    tp, optional, marks = _split(tp)
    mapping = next((m for m in marks if isinstance(m, Mapping)), None)
    if mapping is not None:
        return isinstance(v, dict) or (v is None and mapping.optional)
    if v is None:
        return optional or tp is Any
    origin = get_origin(tp) or tp
    if tp is Any or tp is object:
        return True
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return isinstance(v, tp) or v in {m.value for m in tp}
    if origin in (list, tuple):
        item = (get_args(tp) or (Any,))[0]
        return isinstance(v, (list, tuple)) and all(_fits(item, x) for x in v)
    if origin is dict:
        return isinstance(v, dict)
    return True


def _within(marks: tuple, v: Any) -> bool:
    items = v if isinstance(v, (list, tuple)) else [v]
    return all(x in m for m in marks if isinstance(m, (Range, OneOf)) for x in items if x is not None)


def allowed(annotation: Any) -> str:
    """What an option of this annotation accepts, in words: ``an integer >= 1``, ``null or in (0, 1)``."""
    tp, optional, marks = _split(annotation)
    rule = next((m for m in marks if isinstance(m, (Range, OneOf))), None)
    origin = get_origin(tp) or tp
    mapping = next((m for m in marks if isinstance(m, Mapping)), None)
    if mapping is not None:
        return "null or a mapping" if mapping.optional else "a mapping"
    if origin in (list, tuple):
        item = _split((get_args(tp) or (Any,))[0])[0]
        text = f"a list of {_NOUNS.get(item, ('', 'values'))[1]}" + (f" {rule}" if rule else "")
    elif isinstance(rule, OneOf):
        text = str(rule)
    elif isinstance(tp, type) and issubclass(tp, Enum):
        text = "one of " + ", ".join(m.value for m in tp)
    elif isinstance(rule, Range):
        text = f"an integer {rule}" if tp is int else f"a number {rule}" if tp is float else str(rule)
    elif origin is dict:
        text = "a mapping"
    else:
        text = _NOUNS.get(tp, ("any value",))[0]
    return f"null or {text}" if optional else text


def _show(v: Any) -> str:
    return str(v.value) if isinstance(v, Enum) else repr(v) if isinstance(v, str) else str(v)


def check(key: str, annotation: Any, value: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` has the annotation's type and lies within its markers."""
    if value is MISSING:
        raise ConfigError(f"{key} is required: give it a value ({allowed(annotation)})")
    if not (_fits(annotation, value) and _within(_split(annotation)[2], value)):
        raise ConfigError(f"{key} must be {allowed(annotation)}, got {_show(value)}")


@functools.lru_cache(maxsize=None)
def hints(schema: type) -> dict[str, Any]:
    """The annotated fields of a schema dataclass (markers included)."""
    return {f.name: f.type for f in dataclasses.fields(schema)} | typing.get_type_hints(schema, include_extras=True)


def check_options(schema: type, group: str, values: dict[str, Any]) -> None:
    """Check the given ``values`` (a subset of the schema's keys) as ``<group>.<key>``."""
    types_ = hints(schema)
    for key, value in values.items():
        if key in types_:
            if isinstance(value, (DictConfig, ListConfig)):  # passed by hydra.utils.instantiate unconverted
                value = OmegaConf.to_container(value, resolve=True)
            check(f"{group}.{key}", types_[key], value)


# -- deriving a schema from a signature -------------------------------------------------------------------------------
def target_path(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _own(target: Any) -> tuple[list[inspect.Parameter], Callable | None, type | None]:
    """Explicit keyword parameters of a class's own ``__init__`` (or a function), the callable they belong to, and the
    class whose options ``**kwargs`` (or no own ``__init__``) inherits."""
    if not isinstance(target, type):
        fn, parent = target, None
    elif "__init__" in vars(target):
        fn, parent = target.__init__, target.__mro__[1]
    else:
        parent = target.__mro__[1]
        return [], None, (None if parent is object else parent)
    params = list(inspect.signature(fn).parameters.values())
    if isinstance(target, type):
        params = params[1:]  # self
    inherits = any(p.kind is p.VAR_KEYWORD for p in params)
    own = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return own, fn, (parent if inherits and parent is not object else None)


def _field_type(tp: Any) -> Any:
    """The annotation as OmegaConf accepts it: ``X | None`` -> ``Optional[X]``, tuples -> lists, dicts -> ``Any``
    marked :class:`Mapping` (markers kept)."""
    base, optional, marks = _split(tp)
    if (get_origin(base) or base) is dict:
        return Annotated[(Any, *marks, Mapping(optional))]
    if get_origin(tp) is Annotated:
        return Annotated[(_field_type(get_args(tp)[0]), *get_args(tp)[1:])]
    if get_origin(tp) is types.UnionType:
        return Union[tuple(_field_type(a) for a in get_args(tp))]
    if get_origin(tp) is tuple:
        return list[get_args(tp)[0]] if get_args(tp) else list
    return tp


def _default(value: Any) -> dataclasses.Field:
    if value is inspect.Parameter.empty:
        return dataclasses.field(default=MISSING)
    if isinstance(value, (list, tuple, dict)):
        return dataclasses.field(default_factory=lambda v=value: dict(v) if isinstance(v, dict) else list(v))
    return dataclasses.field(default=value)


_SCHEMAS: dict[Any, type] = {}


def schema_of(target: Any, exclude: tuple[str, ...] = (), base: type | None = None,
              extra: dict[str, tuple[Any, Any]] | None = None) -> type:
    """The options dataclass of a class or builder (cached): ``_target_``, the inherited options, then its own
    parameters except ``exclude`` (values the runner injects), plus ``extra`` ``{name: (type, default)}`` keys."""
    if target in _SCHEMAS:
        return _SCHEMAS[target]
    own, fn, parent = _own(target)
    bases = tuple(b for b in (base, schema_of(parent) if parent is not None else None) if b is not None)
    try:
        types_ = typing.get_type_hints(fn, include_extras=True) if fn is not None else {}
    except Exception:  # an annotation that does not resolve at run time: untyped
        types_ = {}
    fields: list[tuple] = [("_target_", str, dataclasses.field(default=target_path(target)))]
    fields += [(k, t, _default(d)) for k, (t, d) in (extra or {}).items()]
    fields += [(p.name, _field_type(types_.get(p.name, Any)), _default(p.default)) for p in own if p.name not in exclude]
    name = "".join(part[:1].upper() + part[1:] for part in target.__name__.split("_")) + "Options"
    schema = dataclasses.make_dataclass(name, fields, bases=bases)
    schema.__module__ = target.__module__
    _SCHEMAS[target] = schema
    return schema


def signature_of(schema: type) -> inspect.Signature:
    """The keyword-only signature whose parameters are the schema's keys (``_target_`` and the like left out)."""
    params = []
    for f in dataclasses.fields(schema):
        if f.name.startswith("_"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints(schema)[f.name],
                                        default=inspect.Parameter.empty if default is MISSING else default))
    return inspect.Signature(params)


def defaults(schema: type) -> dict[str, Any]:
    """The schema's default values (fresh copies of mutable ones), ``_``-keys left out."""
    out = {}
    for f in dataclasses.fields(schema):
        if not f.name.startswith("_"):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


# -- the registry ---------------------------------------------------------------------------------------------------
#: (group, option name) -> schema dataclass, filled by :func:`option` and :func:`register` at import time
OPTIONS: dict[tuple[str, str], type] = {}


def register(group: str, name: str, schema: type) -> type:
    """Register ``schema`` as the schema of option ``name`` of ``group`` (stored as ``<name>_schema``)."""
    known = OPTIONS.get((group, name))
    if known is not None and known is not schema:
        raise ValueError(f"{group} option '{name}' has two schemas: {known.__name__} and {schema.__name__}")
    OPTIONS[(group, name)] = schema
    return schema


def option(group: str, name: str | None = None, *, exclude: tuple[str, ...] = (), base: type | None = None,
           extra: dict[str, tuple[Any, Any]] | None = None, overrides: dict[str, Any] | None = None) -> Callable:
    """Class/builder decorator: derive its schema (:func:`schema_of`), register it as option ``name`` (default: the
    lower-cased name) of ``group``, and check the arguments of each call against it. ``overrides`` changes inherited
    defaults (``{"rounds": 10}``); a class then receives every option explicitly, so class and schema agree."""
    def decorate(target: Any) -> Any:
        schema = schema_of(target, exclude, base, extra)
        if overrides:
            schema = dataclasses.make_dataclass(schema.__name__, [(k, hints(schema)[k], _default(v))
                                                                  for k, v in overrides.items()], bases=(schema,))
            schema.__module__ = target.__module__
        register(group, name or target.__name__.lower(), schema)
        wrapped = _checked(target, schema, group, bool(overrides))
        _SCHEMAS[wrapped] = _SCHEMAS[target] = schema
        return wrapped

    return decorate


def _checked(target: Any, schema: type, group: str, pass_defaults: bool) -> Any:
    """``target`` with each call's options checked against ``schema`` (``ConfigError`` naming ``<group>.<key>``)."""
    own_names = [p.name for p in _own(target)[0]]
    if isinstance(target, type):
        init = target.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            given = {**dict(zip(own_names, args)), **kwargs}
            check_options(schema, group, given)
            if pass_defaults:
                kwargs = {**{k: v for k, v in defaults(schema).items() if k not in given}, **kwargs}
            init(self, *args, **kwargs)

        target.__init__ = __init__
        target.__signature__ = signature_of(schema)
        return target

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        check_options(schema, group, {**dict(zip(own_names, args)), **kwargs})
        return target(*args, **kwargs)

    return call


def import_all(packages: tuple[str, ...]) -> None:
    """Import every module of ``packages`` (modules or packages), so their :func:`option` decorators run."""
    import importlib
    import pkgutil

    for name in packages:
        module = importlib.import_module(name)
        for info in pkgutil.iter_modules(getattr(module, "__path__", []), prefix=f"{name}."):
            if info.name not in sys.modules:
                importlib.import_module(info.name)


__all__ = ["ConfigError", "Mapping", "OPTIONS", "OneOf", "Range", "allowed", "check", "check_options", "hints",
           "option", "register", "schema_of"]
