"""The one error type a user sees: the command line prints its message as one paragraph and exits 2."""
from __future__ import annotations

import difflib
import json


class UserError(Exception):
    """Bad input or an impossible request; the message says what is wrong and what would help."""


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


def read_json(path: str, what: str, missing_hint: str = ""):
    """A user's JSON file, or a UserError that names it: '<what> '<path>' does not exist' or 'is not readable'."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} '{path}' does not exist{missing_hint}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} '{path}' is not readable JSON ({e}).") from None
