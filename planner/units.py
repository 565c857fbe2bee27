"""Sizes on the command line: one convention and one parser for every size flag of every subcommand.

A bare number is GiB (2^30 bytes): `--vram 24`, `--host-ram 256`, `--nvme 2000`, `--reserve 1.5`. A suffix names
the unit, case-insensitively: binary KiB, MiB, GiB, TiB (and their one-letter forms K, M, G, T, as `free -g` and
`docker --memory 24g` read them) or decimal KB, MB, GB, TB (10^3 ... 10^12, as drive makers and `df -H` count),
or B for bytes. So `24GiB` == `24G` == `24`, `2TB` is 2e12 bytes (1862.6 GiB), `512GB` is 476.8 GiB.

Plan and hardware JSON store sizes in bytes (`*_bytes`) or in GiB where the field says so (`vram_gib`, `ram_gib`,
`nvme_gib`): the parser returns GiB, the unit those fields hold."""
from __future__ import annotations

import math
import re

from planner.errors import UserError

GIB = 1 << 30
GB = 10**9
TB = 10**12

_UNITS = {"": GIB, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": GIB, "gib": GIB,
          "t": 1 << 40, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": GB, "tb": TB}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")

SIZE_EXAMPLES = "24 = 24G = 24GiB, 800MiB, 1.5TiB; decimal 512GB, 2TB"
SIZE_HELP = f"GiB, or with a unit: {SIZE_EXAMPLES}"


def size_gib(flag: str, value, *, allow_zero: bool = False, upper_gib: float | None = None) -> float | None:
    """A size flag's value in GiB: a number (GiB) or a string with an optional unit suffix (module docstring).

    None stays None (the flag was not given). NaN, infinities, negatives, zero (unless `allow_zero`), sizes above
    `upper_gib` and anything that does not parse are a UserError that names the flag and the convention."""
    if value is None:
        return None
    what = "a capacity (0 for none)" if allow_zero else "a positive number"
    bad = UserError(f"{flag} must be {what} of GiB, or a size with a unit ({SIZE_EXAMPLES}); got {value!r}.")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        gib, shown = float(value), repr(float(value))
    else:
        m = _SIZE.fullmatch(str(value))
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise bad
        gib = float(m.group(1)) * _UNITS[unit] / GIB
        shown = repr(float(m.group(1))) if unit == "" else str(value).strip()
    if not math.isfinite(gib) or gib < 0 or (gib == 0 and not allow_zero):
        raise bad
    if upper_gib is not None and gib > upper_gib:
        raise UserError(f"{flag} = {shown} is absurd (more than {upper_gib:,.0f} GiB); check the unit "
                        f"({SIZE_HELP}).")
    return gib


def fmt_bytes(n: float) -> str:
    """A byte count for a message: two significant decimals in the largest binary unit below it, '0 B' for 0."""
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def flag_size(gib: float) -> str:
    """A size to suggest on the command line, rounded up to 4 significant digits (so it is still enough, and at
    most 0.1% more): '306.2GiB', '2.134GiB', '621.1MiB'."""
    for unit, scale in (("TiB", 1 / 1024), ("GiB", 1.0), ("MiB", 1024.0), ("KiB", 1024.0**2)):
        x = gib * scale
        if x >= 1 or unit == "KiB":
            decimals = max(0, 3 - math.floor(math.log10(x))) if x > 0 else 0
            return f"{math.ceil(x * 10**decimals - 1e-9) / 10**decimals:.{decimals}f}{unit}"
    raise AssertionError("unreachable")
