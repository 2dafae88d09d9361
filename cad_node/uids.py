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
    "lenient_uid",
    "normalize_uid",
    "uid_problem",
    "validate_uid",
]

#: Maximum length of a UID in characters (PS3.5 9.1 and VR UI, PS3.5 6.2).
UID_MAX_LENGTH = 64

_COMPONENT = re.compile(r"0|[1-9][0-9]*")
#: A whole valid UID (PS3.5 9.1) apart from the length limit; ASCII digits only.
_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
#: Digits and dots with no empty component: what :func:`lenient_uid` accepts.
_DIGIT_COMPONENTS = re.compile(r"[0-9]+(?:\.[0-9]+)*")


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


def lenient_uid(value: str, what: str = "UID") -> tuple[str, str | None]:
    """Normalize and check a peer-supplied UID with the SCP's lenient policy.

    Real modalities send UIDs with a component that starts with ``0``
    (``1.2.840.0113...``): PS3.5 9.1 forbids it, pydicom reads it, and
    refusing such a study would lose it.  Such a UID is accepted and its
    defect returned, so the caller can store the instance and flag it.
    Everything that could be dangerous or is unreadable is still refused.

    Parameters
    ----------
    value : str
        Raw UID value (trailing NULL/space padding is removed).
    what : str, optional
        Name of the attribute, used in messages.

    Returns
    -------
    tuple of (str, str or None)
        The normalized UID, and ``None`` or the defect that was tolerated
        (``"<what> component N has a leading zero"``).

    Raises
    ------
    InvalidUIDError
        Empty; longer than :data:`UID_MAX_LENGTH`; a character other than
        ``0-9`` and ``.`` (so no ``/``, ``..`` path traversal or control
        characters); an empty component (leading, trailing or doubled dot).
    TypeError
        ``value`` is not a ``str``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    normalized = normalize_uid(value)
    if len(normalized) <= UID_MAX_LENGTH and _UID.fullmatch(normalized):
        return normalized, None
    problem = uid_problem(normalized)
    if (
        problem is not None
        and problem.endswith("has a leading zero")
        and len(normalized) <= UID_MAX_LENGTH
        and _DIGIT_COMPONENTS.fullmatch(normalized)
    ):
        return normalized, f"{what} {problem[4:]}"
    if problem is None:  # pragma: no cover - the regex and uid_problem agree
        return normalized, None
    if problem.endswith("has a leading zero"):  # and something worse later on
        problem = "UID has an empty component or a character other than 0-9 and '.'"
        if len(normalized) > UID_MAX_LENGTH:
            problem = f"UID has {len(normalized)} characters, more than {UID_MAX_LENGTH}"
    shown = normalized if len(normalized) <= 80 else normalized[:77] + "..."
    raise InvalidUIDError(f"{what} {shown!r} is invalid: {problem}")
