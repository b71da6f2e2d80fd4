"""The one rule for names a client chooses: image ids, namespaces, job ids (torch-free).

The gateway applies it at the edge (query string, form field, JSON body, job files) and the
worker applies it again to every item before it is stored, so a name the store cannot hold
(HDF5 variable-length strings refuse an embedded NUL) fails only its own request or job item.

* image id: 1 to ``MAX_IMAGE_ID_CHARS`` printable characters: no control character (C0 incl.
  NUL, tab and newline; DEL; C1), no line or paragraph separator (U+2028, U+2029), no lone
  surrogate; any other Unicode is kept as given, ``/`` and spaces included (ids from job
  directories are relative paths). ``IMAGE_ID_PATTERN`` is the same rule as a regex.
* namespace: 1 to ``MAX_NAMESPACE_CHARS`` of ``A-Z a-z 0-9 . _ -`` (it names a Redis key and an
  alias file, and is read back by ``GET /v1/features/{image_id}?namespace=``).
* job id (``Idempotency-Key``): 1 to ``MAX_JOB_ID_CHARS`` printable ASCII characters, no space.
"""

from __future__ import annotations

import re

MAX_IMAGE_ID_CHARS = 512
MAX_NAMESPACE_CHARS = 64
MAX_JOB_ID_CHARS = 200

_NOT_PRINTABLE = r"\x00-\x1f\x7f-\x9f\u2028\u2029"  # + lone surrogates, checked apart
IMAGE_ID_PATTERN = rf"^[^{_NOT_PRINTABLE}]{{1,{MAX_IMAGE_ID_CHARS}}}$"
_IMAGE_ID = re.compile(IMAGE_ID_PATTERN)
_SURROGATE = re.compile("[\ud800-\udfff]")
NAMESPACE_PATTERN = rf"^[A-Za-z0-9._-]{{1,{MAX_NAMESPACE_CHARS}}}$"
_NAMESPACE = re.compile(NAMESPACE_PATTERN)
_JOB_ID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_JOB_ID_CHARS}}}$")

IMAGE_ID_RULE = (
    f"an image id is 1 to {MAX_IMAGE_ID_CHARS} printable characters "
    "(no NUL or other control character, no line or paragraph separator)"
)
NAMESPACE_RULE = f"a namespace is 1 to {MAX_NAMESPACE_CHARS} characters of A-Z a-z 0-9 . _ -"
JOB_ID_RULE = f"an Idempotency-Key is 1 to {MAX_JOB_ID_CHARS} printable ASCII characters, no space"


class InvalidNameError(ValueError):
    """A client-chosen name that breaks the rule; the message states the rule and the value."""

    def __init__(self, rule: str, value: str) -> None:
        shown = value if len(value) <= 80 else f"{value[:80]}... ({len(value)} characters)"
        super().__init__(f"{rule}; got {shown!r}")
        self.rule = rule


def image_id_problem(value: str) -> str | None:
    """None when ``value`` is a valid image id, else the rule it breaks (with the value)."""
    if _IMAGE_ID.match(value) and not _SURROGATE.search(value):
        return None
    return str(InvalidNameError(IMAGE_ID_RULE, value))


def name_problem(namespace: str, image_id: str) -> str | None:
    """Why ``(namespace, image_id)`` cannot be stored (namespace "" = none), or None."""
    if namespace and not _NAMESPACE.match(namespace):
        return str(InvalidNameError(NAMESPACE_RULE, namespace))
    return image_id_problem(image_id)


def check_image_id(value: str) -> str:
    """``value`` unchanged when it is a valid image id.

    Raises:
        InvalidNameError: empty, over ``MAX_IMAGE_ID_CHARS``, or a non-printable character.
    """
    if image_id_problem(value) is not None:
        raise InvalidNameError(IMAGE_ID_RULE, value)
    return value


def check_namespace(value: str) -> str:
    """``value`` unchanged when it is a valid namespace (``NAMESPACE_PATTERN``).

    Raises:
        InvalidNameError: any other character, empty, or over ``MAX_NAMESPACE_CHARS``.
    """
    if not _NAMESPACE.match(value):
        raise InvalidNameError(NAMESPACE_RULE, value)
    return value


def check_job_id(value: str) -> str:
    """``value`` unchanged when it can be a job id / Idempotency-Key.

    Raises:
        InvalidNameError: empty, too long, a space or a non-ASCII / control character.
    """
    if not _JOB_ID.match(value):
        raise InvalidNameError(JOB_ID_RULE, value)
    return value
