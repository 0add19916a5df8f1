"""Parsing and printing of byte sizes ("8GiB", "512MB", "1.5e9").

Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) suffixes are both accepted, case-
insensitively; a bare number is bytes.
"""

from __future__ import annotations

import math
import re

from autotune.errors import UserInputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """Returns the number of bytes ``text`` names; raises UserInputError if it names none."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise UserInputError(
                f"{what}: expected a size such as 8GiB, 512MiB, 16GB or a number of bytes; "
                f"got {text!r}"
            )
        number = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(number) or number >= 2**63:  # 1e400 is inf: no int holds it
            raise UserInputError(f"{what}: {text!r} is beyond any memory; expected a size such "
                                 "as 8GiB")
        value = int(number)
    if value <= 0:
        raise UserInputError(f"{what}: expected a positive size; got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Formats bytes with a binary unit, 3 significant digits: 8.00 GiB, 405 MiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v >= 100 else f"{v:.2f} {unit}"
    return f"{int(n)} B"


def size_as_typed(n: int) -> str:
    """A size as a user would type it: 8GiB, 7.5GiB, 600MiB, else bytes (a GiB figure that
    would not read back exactly, as 600MiB's 0.585938GiB, is not one)."""
    gib = f"{n / 2**30:g}"
    if float(gib) * 2**30 == n:
        return f"{gib}GiB"
    return f"{n // 2**20}MiB" if n % 2**20 == 0 else str(n)


GiB = 2**30
