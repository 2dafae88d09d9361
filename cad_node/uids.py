"""Validation of DICOM Unique Identifiers (PS3.5 9.1, VR UI PS3.5 6.2).

A UID is a string of at most 64 characters made of numeric components
separated by dots.  Each component is a non-empty run of digits; a component
of more than one digit must not start with ``0`` (PS3.5 9.1: "the first digit
of each component shall not be zero unless the component is a single digit").

UIDs arriving from the network are *peer-supplied strings*.  The node never
builds a filesystem path from one; validation here is defence in depth and the
reason for a precise failure status at the network edge.

On the wire a UI value of odd length is padded with a single trailing NULL
(PS3.5 6.2).  :func:`normalize_uid` removes that padding (and, being lenient
with real-world senders, trailing spaces) before validation.
"""

from __future__ import annotations

import re

__all__ = [
    "UID_MAX_LENGTH",
    "InvalidUIDError",
    "is_valid_uid",
    "normalize_uid",
    "uid_problem",
    "validate_uid",
]

#: Maximum length of a UID in characters (PS3.5 9.1 and VR UI, PS3.5 6.2).
UID_MAX_LENGTH = 64

_COMPONENT = re.compile(r"0|[1-9][0-9]*")
#: A whole valid UID (PS3.5 9.1) apart from the length limit; ASCII digits only.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


class InvalidUIDError(ValueError):
    """A string that is not a valid DICOM UID (PS3.5 9.1)."""


def normalize_uid(value: str) -> str:
    """Remove the trailing NULL padding (and trailing spaces) of a UI value.

    Parameters
    ----------
    value : str
        Raw value, e.g. as decoded from a DIMSE command or data set.

    Returns
    -------
    str
        The value without trailing ``"\\x00"`` and ``" "`` characters.
    """
    return value.rstrip("\x00 ")


def uid_problem(value: str) -> str | None:
    """Explain why ``value`` is not a valid UID, or return ``None`` if it is.

    Parameters
    ----------
    value : str
        Candidate UID, already normalized (no padding).

    Returns
    -------
    str or None
        A short human-readable reason, or ``None`` when ``value`` is valid.
    """
    if not value:
        return "UID is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"UID has {len(value)} characters, more than {UID_MAX_LENGTH}"
    for index, component in enumerate(value.split(".")):
        if not component:
            return f"UID component {index + 1} is empty"
        if not component.isascii() or not component.isdigit():
            return f"UID component {index + 1} contains a character other than 0-9"
        if not _COMPONENT.fullmatch(component):
            return f"UID component {index + 1} has a leading zero"
    return None


def is_valid_uid(value: str) -> bool:
    """Return ``True`` when ``value`` is a valid UID (PS3.5 9.1).

    Parameters
    ----------
    value : str
        Candidate UID; padding is *not* removed (call :func:`normalize_uid`).

    Returns
    -------
    bool
        Whether ``value`` satisfies every rule of PS3.5 9.1.
    """
    return uid_problem(value) is None


def validate_uid(value: str, what: str = "UID") -> str:
    """Normalize and validate a UID.

    Parameters
    ----------
    value : str
        Raw UID value (trailing NULL padding is allowed and removed).
    what : str, optional
        Name of the attribute, used in the error message.

    Returns
    -------
    str
        The normalized, valid UID.

    Raises
    ------
    InvalidUIDError
        The value breaks a rule of PS3.5 9.1; the message names ``what`` and
        the rule (the value itself is shown with ``repr`` and truncated).
    TypeError
        ``value`` is not a ``str``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    normalized = normalize_uid(value)
    if len(normalized) <= UID_MAX_LENGTH and _UID.fullmatch(normalized):
        return normalized  # the common case: one regex match instead of a walk
    problem = uid_problem(normalized)
    if problem is not None:
        shown = normalized if len(normalized) <= 80 else normalized[:77] + "..."
        raise InvalidUIDError(f"{what} {shown!r} is invalid: {problem}")
    return normalized
