"""The one error type a user sees: the command line prints its message as one paragraph and exits 2."""
from __future__ import annotations

import difflib
import json


class UserError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what would help."""
    exit_code = 2   # what the command line exits with (a subclass may say otherwise: see runtime.trainer)


def closest(word: str, known) -> str:
    """' (did you mean X?)' for the closest known names, or ''."""
    near = difflib.get_close_matches(str(word), list(known), n=3, cutoff=0.4)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def check_positive(flag: str, value, *, upper=None, integer=False):
    """Validate a flag's number at the edge: positive, finite, below an absurd bound."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > 0
    if ok and integer and int(value) != value:
        ok = False
    if not ok:
        raise UserError(f"{flag} must be a positive {'integer' if integer else 'number'}, got {value!r}.")
    if upper is not None and value > upper:
        raise UserError(f"{flag} = {value} is absurd (more than {upper}); check the unit.")
    return value


MAX_JSON_BYTES = 256 << 20   # plans, configs and traces are far smaller; a bigger file is a mistake


def require_regular_file(path: str, what: str, missing_hint: str = "") -> None:
    """Refuse anything but a regular file before opening it: a FIFO or a device would block the open or the read
    forever, a directory fails obscurely. Raises UserError naming `what`."""
    import os
    import stat
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{what}: the path is empty.")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist{missing_hint}.") from None
    except OSError as e:
        raise UserError(f"{what} '{path}' is not accessible ({e.strerror or e}).") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UserError(f"{what} '{path}' is {kind}; give a regular file.")


def read_json(path: str, what: str, missing_hint: str = ""):
    """A user's JSON file, or a UserError that names it: '<what> '<path>' does not exist' or 'is not readable'.
    Only regular files are opened (a FIFO would block); nesting too deep for the parser is refused."""
    import os
    require_regular_file(path, what, missing_hint)
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise UserError(f"{what} '{path}' is larger than {MAX_JSON_BYTES >> 20} MiB; not a file Blockfit writes.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist{missing_hint}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{what} '{path}' is not readable JSON ({' '.join(str(e).split())[:200]}).") from None
    except RecursionError:
        raise UserError(f"{what} '{path}' nests JSON too deeply to be a Blockfit file.") from None
