"""User-facing errors."""

from __future__ import annotations

import re
from typing import Callable

_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class UsageError(Exception):
    """A user-facing input error in one line; the CLI prints it and exits 2.

    Library code names its inputs by their field names in backticks ("`l1` values must be
    >= 0") and sets `field` to the main one, a machine-readable name (`l1`, `dict_sizes`,
    `lr`, ...). `render(name)` rewrites every backticked field with `name(field)`; the CLI
    passes its field -> flag map, so the command speaks in flags.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def render(self, name: Callable[[str], str]) -> str:
        return _FIELD.sub(lambda m: name(m.group(1)), str(self))
