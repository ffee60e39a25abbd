"""A training or run option is defined once: as a dataclass field (`knob`) whose metadata carries
what its command-line flag needs (help, choices, parser, group, a name where the flag's differs
from the field's, a `--no-...` spelling). `sae_jax.cli` generates its flags from the fields of
`config.TrainConfig`, `resample.ResampleConfig` and `run.RunOptions`, and maps them back onto the
fields by name."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator

TRAINING, ARCHS, RESAMPLING, RUN = ("training", "architectures other than relu_l1",
                                    "resampling (on in --recipe fast)", "run")


def knob(default: Any, help: str, *, group: str = TRAINING, flag: str | None = None,
         choices: tuple | None = None, parse: Callable[[str], Any] | None = None,
         boolean: str | None = None, cli: bool = True, cli_default: Any = None) -> Any:
    """A dataclass field with its flag's metadata.

    flag: the flag when it is not --field-name; boolean: "switch" (a store-true flag, or with a
    flag named --no-... a store-false one), "both" (--name and --no-name); cli=False: no flag;
    cli_default: the flag's default (None: the recipe's or the dataclass's value applies)."""
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "parse": parse,
            "boolean": boolean, "cli": cli, "cli_default": cli_default}
    return dataclasses.field(default=default, metadata={"knob": meta})


def fixed(default: Any, why: str) -> Any:
    """A field that is not a flag (`why` documents it)."""
    return knob(default, why, cli=False)


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # the option's name as recipes and library errors use it
    flag: str  # the command-line flag, --...
    meta: dict

    @property
    def dest(self) -> str:  # the parsed value's attribute: the option's name
        return self.name


def flags(cls: type, rename: Callable[[str], str] = lambda name: name) -> Iterator[Flag]:
    """The flags of a dataclass's knobs, in field order (`rename`: field -> the option's name)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("knob")
        if meta and meta["cli"]:
            name = rename(f.name)
            yield Flag(name, meta["flag"] or "--" + name.replace("_", "-"), meta)


def add(parser: argparse.ArgumentParser, groups: dict[str, Any], flag: Flag) -> None:
    """Adds one flag to its argparse group (made on first use)."""
    m = flag.meta
    group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
    kw: dict[str, Any] = {"help": m["help"], "default": m["cli_default"], "dest": flag.dest}
    if m["boolean"] == "both":
        kw["action"] = argparse.BooleanOptionalAction
    elif m["boolean"] == "switch":
        kw["action"] = "store_false" if flag.flag.startswith("--no-") else "store_true"
        kw["default"] = m["cli_default"] if m["cli_default"] is not None else (
            True if flag.flag.startswith("--no-") else None)
    else:
        kw["type"] = m["parse"]
        if m["choices"]:
            kw["choices"] = m["choices"]
    group.add_argument(flag.flag, **kw)


def values(args: argparse.Namespace, flags_: list[Flag]) -> dict[str, Any]:
    """{option name: the parsed value} (None where a flag was not given and has no default)."""
    return {f.name: getattr(args, f.dest) for f in flags_}
