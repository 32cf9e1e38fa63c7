"""One-line errors for bad specs: the field path, the value, and what is allowed."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError


class SpecError(ValueError):
    """A sweep spec that cannot be run as written. The message is one line, meant for the user."""


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic's internal validator / union-branch labels
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a spec may use at `loc` (the parent of an unknown key), for the error message."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        inner = [a for a in _flatten_annotation(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _flatten_annotation(annotation) -> list:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [a for arg in args for a in _flatten_annotation(arg)]


def one_line(err: ValidationError, model: type[BaseModel], source: str = "spec") -> SpecError:
    """Turn pydantic's error list into one line: the first error, with a hint at what is allowed. An unknown key
    comes first: a misspelt required key (`grdi:`) is also reported missing, and the typo is the one to fix."""
    first = next((e for e in err.errors() if e["type"] == "extra_forbidden"), err.errors()[0])
    loc = tuple(first["loc"])
    where = _path(loc)
    if first["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        key = str(loc[-1])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return SpecError(f"{source}: unknown key '{where}'; {hint}allowed here: {', '.join(allowed)}")
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return SpecError(f"{source}: {where} = {shown}: {msg}{more}")
