"""Click options made from an option schema (:mod:`dnsconvert.options`), so that a command's
flags and a pipeline file's keys are one definition: ``target_sparsity`` <-> ``--target-sparsity``."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

import click


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _pairs(ctx, param, values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: write it as NAME=VALUE", ctx=ctx, param=param)
    return out


def _json_object(ctx, param, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"is not JSON ({exc.msg})", ctx=ctx, param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object", ctx=ctx, param=param)
    return data


def _shape(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if not value:
        return None
    try:
        shape = tuple(int(part) for part in value.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a shape; write it as 1,3,224,224", ctx=ctx, param=param) from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{value!r} is not a shape of positive sizes", ctx=ctx, param=param)
    return shape


def _option_for(name: str, annotation: Any, default: Any, help_text: str, extra: dict[str, Any] | None = None):
    """The click option of one schema field (``extra``: the field's ``flag`` and ``metavar``)."""
    extra = extra or {}
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
        origin = typing.get_origin(annotation)
    flag = _flag(extra.get("flag", name))
    shown = default not in (None, {}, ()) and not isinstance(default, dict)
    if annotation is bool and optional:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if annotation is bool:
        return click.option(flag, name, is_flag=True, default=default, help=help_text)
    if origin is Literal:
        return click.option(flag, name, type=click.Choice(typing.get_args(annotation)), default=default, show_default=shown, help=help_text)
    if origin is dict:
        value_type = typing.get_args(annotation)[1]
        if value_type is float:
            return click.option(flag, name, multiple=True, metavar="NAME=VALUE", callback=_pairs, help=help_text + " (repeatable)")
        return click.option(flag, name, default=None, metavar="JSON", callback=_json_object, help=help_text)
    if origin is tuple and typing.get_args(annotation)[0] is int:
        return click.option(flag, name, default=None, metavar="N,N,...", callback=_shape, help=help_text)
    if origin is tuple:
        return click.option(flag, name, multiple=True, default=default, metavar=extra.get("metavar"), help=help_text + " (repeatable)")
    kind = {int: int, float: float, str: str}.get(annotation, str)
    return click.option(flag, name, type=kind, default=default, show_default=shown, help=help_text)


def schema_options(schema: type, *, exclude: tuple[str, ...] = ()):
    """Decorate a click command with one option per field of ``schema``."""

    def decorator(func):
        for name, info in reversed(list(schema.__pydantic_fields__.items())):
            if name in exclude:
                continue
            default = info.get_default(call_default_factory=True)
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else None
            func = _option_for(name, info.annotation, default, info.description or "", extra)(func)
        return func

    return decorator


def options_from(schema: type, params: dict[str, Any]):
    """The schema record of a command's parsed params (fields not given keep their defaults);
    the params it used are removed from ``params``."""
    values = {}
    for name in schema.__pydantic_fields__:
        if name not in params:
            continue
        value = params.pop(name)
        if value is None or value == () or value == {}:
            continue
        values[name] = value
    return schema(**values)
