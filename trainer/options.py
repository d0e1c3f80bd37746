"""Every training and run option, defined once: type, default, range, help, flag and run.yaml key.

An option is a dataclass field made by `option(...)`; its type is the field's annotation. From those fields come

- the command-line flags (`add_flags`) and the values they give (`from_args`): `fidel train`,
  `fidel experimental-resume`;
- the check of a run.yaml mapping (`from_mapping`): top-level keys (tasks/spec.py RunSpec) and sections such
  as `train:`;
- the option table in README.md (`markdown_table`, printed by `fidel options --markdown`);
- the dataclass's own check: call `check(self)` in `__post_init__`, so a bad value stops at construction.

A problem names the setting as the user gave it: the flag they typed (`--save-every`), the run.yaml key
(`train.max_steps`), or the field name when built in Python. Nothing is read, written or started before.

Adding an option: add a field `name: type = option(default, help="...", min=...)` to the dataclass it belongs to.
TrainConfig (below) holds what training uses: a flag of `fidel train` and a `train:` key of run.yaml
(`yaml=False` or `flag=None` to leave one out). LaunchOptions (below) holds how training starts its
processes: `fidel train` flags and run.yaml's `launch:` section. Adding a run.yaml section: write a dataclass of options that calls `check(self)` in
`__post_init__`, and give RunSpec a field `name: Cls = section(Cls, help="...")`; `from_mapping` then checks
`name:` in run.yaml key by key, and the option table lists its keys as `name.key`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable

from fidel_tts.trainer.errors import FidelError

MISSING = dataclasses.MISSING


def option(default=MISSING, *, help: str, flag: str | None = "", aliases: tuple[str, ...] = (), yaml: bool = True,
           min: float | None = None, max: float | None = None, above: float | None = None,
           choices: tuple | None = None, zero_means_unset: bool = False, const=None, flag_default=None,
           check: Callable[[object], str | None] | None = None) -> dataclasses.Field:
    """A dataclass field with what the flags, run.yaml and the option table need.

    flag: the flag's name ("" gives --field-name; None: no flag). aliases: older or community spellings.
    yaml: whether run.yaml takes it. min/max: inclusive bounds; above: exclusive lower bound. choices: allowed
    values. zero_means_unset: 0 stands for None (community `--max-steps 0`). const: the value of a bare flag
    (`--amp` alone). flag_default: a required field's default when given as a flag (community paths).
    check: value → problem or None, for rules bounds cannot say.
    """
    meta = {"help": help, "flag": flag, "aliases": aliases, "yaml": yaml, "min": min, "max": max, "above": above,
            "choices": choices, "zero_means_unset": zero_means_unset, "const": const,
            "flag_default": flag_default, "check": check}
    return dataclasses.field(default=default, metadata={"option": meta})


def same_as(cls: type, name: str, default=MISSING) -> dataclasses.Field:
    """Another dataclass's option under its own default, as a run.yaml key and no flag (RunSpec's paths)."""
    meta = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]
    return dataclasses.field(default=default, metadata={"option": {**meta, "flag": None, "yaml": True}})


def section(cls: type, *, help: str) -> dataclasses.Field:
    """A run.yaml section (`train:`, ...): a mapping whose keys are cls's options."""
    return dataclasses.field(default_factory=dict, metadata={"section": cls, "help": help})


def options(cls: type) -> list[tuple[dataclasses.Field, object, dict]]:
    """(field, resolved type, option metadata) of each option of a dataclass, in definition order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name], f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def sections(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "section" in f.metadata]


def flag_names(f: dataclasses.Field, meta: dict) -> list[str]:
    if meta["flag"] is None:
        return []
    return [meta["flag"] or "--" + f.name.replace("_", "-"), *meta["aliases"]]


def negations(f: dataclasses.Field, kind, meta: dict) -> list[str]:
    """`--no-keep-best` and the like: the flags that turn off a true-or-false option that is on by default."""
    on = unwrap(kind)[0] is bool and default_of(f) is True
    return ["--no-" + name[2:] for name in flag_names(f, meta)] if on else []


def default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


# ---- values: convert what the user gave and check it against the definition


def unwrap(kind) -> tuple[object, bool]:
    """(the type, whether None is allowed) of an annotation such as `int | None`."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return kind, False


def type_word(kind) -> str:
    base, _ = unwrap(kind)
    if typing.get_origin(base) is list:
        return "a list of paths"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}[base]


def from_text(text: str, kind):
    """A flag's text as the option's type."""
    base, optional = unwrap(kind)
    if optional and text.lower() in ("none", "null"):
        return None
    if base is int:
        return int(text)
    if base is float:
        return float(text)
    if base is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(text)
    return text


def of_type(value, kind):
    """A value given in Python or YAML as the option's type (no conversion of text to numbers)."""
    base, optional = unwrap(kind)
    if value is None:
        if optional:
            return None
        raise ValueError(value)
    if typing.get_origin(base) is list:
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, os.PathLike)) for i in items):
            raise ValueError(value)
        return [str(i) for i in items]
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (str, os.PathLike)):
        return str(value)
    raise ValueError(value)


def shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def problem_with(value, meta: dict) -> str | None:
    """Why a value of the right type is not allowed, or None."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"choose from {', '.join(map(str, meta['choices']))}, got {shown(value)}"
    if meta["min"] is not None and value < meta["min"]:
        return f"must be at least {meta['min']:g}, got {value:g}"
    if meta["max"] is not None and value > meta["max"]:
        return f"must be at most {meta['max']:g}, got {value:g}"
    if meta["above"] is not None and value <= meta["above"]:
        return f"must be above {meta['above']:g}, got {value:g}"
    return meta["check"](value) if meta["check"] else None


def checked(value, kind, meta: dict, name: str, where=None, text: bool = False):
    """The value as the option's type, or FidelError naming the setting `name` (and `where`: the file)."""
    try:
        value = from_text(value, kind) if text else of_type(value, kind)
    except (TypeError, ValueError):
        got = repr(value) if text else "nothing" if value is None else f"{type(value).__name__} {value!r}"
        raise FidelError(where, f"{name}: expected {type_word(kind)}, got {got}") from None
    if value == "" and unwrap(kind)[1] or meta["zero_means_unset"] and value == 0:
        return None
    problem = problem_with(value, meta)
    if problem:
        raise FidelError(where, f"{name}: {problem}")
    return value


def check(obj) -> None:
    """Check and normalise every option of a dataclass instance (its __post_init__ calls this)."""
    for f, kind, meta in options(type(obj)):
        setattr(obj, f.name, checked(getattr(obj, f.name), kind, meta, f.name))


# ---- run.yaml


def from_mapping(cls: type, raw, where, prefix: str = "") -> dict:
    """The settings of a run.yaml mapping, checked against cls's options and sections: {field: value}.

    Names in problems are the keys as written (`train.max_steps`); `where` is the run file.
    """
    if not isinstance(raw, dict):
        got = "a list" if isinstance(raw, list) else type(raw).__name__
        raise FidelError(where, f"{prefix.rstrip('.') or 'the run file'}: expected a mapping of settings, got {got}")
    known = {f.name: (f, kind, meta) for f, kind, meta in options(cls) if meta["yaml"]}
    nested = {f.name: f for f in sections(cls)}
    unknown = sorted(str(k) for k in raw if k not in known and k not in nested)
    if unknown:
        raise FidelError(where, f"unknown setting(s) {', '.join(prefix + k for k in unknown)}")
    missing = [name for name, (f, _, _) in known.items() if default_of(f) is MISSING and name not in raw]
    if missing:
        raise FidelError(where, f"missing setting(s) {', '.join(prefix + k for k in missing)}")
    values = {}
    for key, value in raw.items():
        if key in nested:
            values[key] = from_mapping(nested[key].metadata["section"], value if value is not None else {}, where,
                                       f"{prefix}{key}.")
        else:
            f, kind, meta = known[key]
            values[key] = checked(value, kind, meta, prefix + key, where)
            if values[key] == []:
                raise FidelError(where, f"{prefix}{key}: name at least one path")
    return values


# ---- flags


class Given(argparse.Action):
    """Keeps each (flag as typed, text): from_args checks them, so a problem names the flag the user typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = self.const if values is None or self.nargs == 0 else values  # a bare `--amp`, `--compile`
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (option_string, text)])


def add_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None,
              required: tuple[str, ...] = ()) -> None:
    """One flag per option of cls (or of `only`); values are checked by from_args, defaults come from cls."""
    for f, kind, meta in options(cls):
        names = flag_names(f, meta)
        if not names or (only is not None and f.name not in only):
            continue
        base, _ = unwrap(kind)
        default = meta["flag_default"] if meta["flag_default"] is not None else default_of(f)
        must = f.name in required or (default is MISSING and meta["flag_default"] is None)
        help_text = meta["help"] + ("" if must or default in (MISSING, None) else f" (default: {default})")
        kwargs = dict(dest=f.name, action=Given, default=argparse.SUPPRESS, required=must, help=help_text,
                      metavar={int: "N", float: "X"}.get(base, "VALUE" if meta["yaml"] else "PATH"))
        if base is bool:
            kwargs.update(nargs=0, const="true")
        elif meta["const"] is not None:
            kwargs.update(nargs="?", const=meta["const"])
        if meta["choices"]:
            kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        parser.add_argument(*names, **kwargs)
        if negations(f, kind, meta):
            parser.add_argument(*negations(f, kind, meta), dest=f.name, action=Given, nargs=0, const="false",
                                default=argparse.SUPPRESS, help=f"turn {names[0]} off")


def from_args(cls: type, args: argparse.Namespace) -> dict:
    """{field: value} for the flags of cls the user gave (plus flag defaults of required paths), checked."""
    values = {}
    for f, kind, meta in options(cls):
        given = getattr(args, f.name, None)
        if not isinstance(given, list):
            if meta["flag_default"] is not None and flag_names(f, meta):
                values[f.name] = meta["flag_default"]
            continue
        if typing.get_origin(unwrap(kind)[0]) is list:
            values[f.name] = [checked(text, str, meta, flag, text=True) for flag, text in given]
            continue
        flag, text = given[-1]
        values[f.name] = checked(text, kind, meta, flag, text=True)
    return values


# ---- the option table


def markdown_table(train_cls: type, launch_cls: type, run_cls: type) -> str:
    """option | flag | run.yaml key | default | range | meaning, for every option, generated from the fields."""
    top = {f.name: f for f, _, _ in options(run_cls)}
    rows = []
    for f, kind, meta in options(train_cls):
        if meta["yaml"]:
            rows.append(row(f, kind, meta, f"train.{f.name}", default_text(f, meta)))
        elif f.name in top:  # a path: a top-level run.yaml key with its own default there
            flag, yaml = default_text(f, meta), default_text(top[f.name], top[f.name].metadata["option"])
            rows.append(row(f, kind, meta, f.name, flag if flag == yaml else f"flag: {flag}; run.yaml: {yaml}"))
        elif flag_names(f, meta):
            rows.append(row(f, kind, meta, "", default_text(f, meta)))
    launch_key = next((f"{sec.name}." for sec in sections(run_cls) if sec.metadata["section"] is launch_cls), None)
    rows += [row(f, kind, meta, f"{launch_key}{f.name}" if launch_key and meta["yaml"] else "", default_text(f, meta))
             for f, kind, meta in options(launch_cls)]
    train_names = {f.name for f in dataclasses.fields(train_cls)}
    rows += [row(f, kind, meta, f.name, default_text(f, meta))
             for f, kind, meta in options(run_cls) if f.name not in train_names]
    for sec in sections(run_cls):
        if sec.metadata["section"] not in (train_cls, launch_cls):
            rows += [row(f, kind, meta, f"{sec.name}.{f.name}", default_text(f, meta))
                     for f, kind, meta in options(sec.metadata["section"])]
    head = "| option | flag | run.yaml key | default | range | meaning |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def default_text(f: dataclasses.Field, meta: dict) -> str:
    default = meta["flag_default"] if meta["flag_default"] is not None and meta["flag"] is not None else default_of(f)
    return "required" if default is MISSING else "unset" if default is None else f"`{default}`"


def row(f: dataclasses.Field, kind, meta: dict, key: str, default: str) -> str:
    flags = ", ".join(f"`{n}`" for n in flag_names(f, meta) + negations(f, kind, meta)) or "—"
    cells = [f"`{f.name}`", flags, f"`{key}`" if key else "—", default, range_text(kind, meta),
             meta["help"].replace("|", "\\|")]
    return "| " + " | ".join(cells) + " |"


def range_text(kind, meta: dict) -> str:
    base, optional = unwrap(kind)
    if meta["choices"]:
        text = " \\| ".join(map(str, meta["choices"]))
    elif meta["min"] is not None or meta["max"] is not None or meta["above"] is not None:
        low = f"≥ {meta['min']:g}" if meta["min"] is not None else f"> {meta['above']:g}" if meta["above"] is not None else ""
        high = f"≤ {meta['max']:g}" if meta["max"] is not None else ""
        text = ", ".join(t for t in (low, high) if t)
        text = f"{type_word(kind)} {text}"
    else:
        text = type_word(kind)
    if meta["zero_means_unset"]:
        text += "; 0: unset"
    return text + ("; or unset" if optional and not meta["zero_means_unset"] else "")
