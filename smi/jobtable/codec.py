"""How a job record is laid out in its Redis hash: short field names, a compact
history, and the job id left to the key.

Why: a job hash of a completed job held about 1.5 KB of names and values, and Redis
spends a jemalloc size class on the listpack that holds them (1,792 bytes plus the
key's overhead: 1.9 KB a job). The long field names (``stripe_checkout_session_id``
26 bytes, ``processing_started_at`` 21) were a third of it and the history another
quarter. Short names, a history in codes and 22-character ids took a completed
job's hash from 1,896 to 1,112 bytes (bench/table.py measures it); the record stays
readable with this table at hand, and ``smi jobs show`` prints it decoded.

The codes are part of the stored format: never reuse or change one (a table written
with the old code would read wrong); add new ones.

The history is one field, a line per status change:
    "<ms since created_at> <from code> <to code> <actor code> <event id>\\n"   ('-': none)
where an event id that is a UUID (make_event_id's always are) is stored as its 16
bytes in 22 characters of base64, and any other as "=" + itself (compact_id). Job
ids are stored the same way wherever the table holds them: in the job's key, index
members, lookup values and deadline sets (keys.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from typing import Any, Mapping

from schemas.job import DONE_PREFIX
from schemas.status import JobStatus, Stage

FIELD_CODES: dict[str, str] = {
    "status": "s", "request_id": "rq", "created_at": "c", "updated_at": "u", "attempts": "n",
    "submit_failures": "sf", "history": "hi",
    # the request
    "image_url": "iu", "resolution": "rs", "email": "em", "post_id": "po", "attachment_id": "ai",
    "image_width": "w", "image_height": "h", "success_url": "su", "cancel_url": "cu",
    # payment
    "stripe_checkout_session_id": "cs", "checkout_url": "co", "stripe_payment_intent_id": "pi",
    "payment_status": "ps", "price_cents": "pr", "cost_cents": "cc", "credits": "cr", "markup_percent": "mk",
    "paid_at": "pa", "payment_failed_at": "pf", "abandoned_at": "ab",
    # processing
    "upsampler_job_id": "up", "callback_token_hash": "cb", "submit_started_at": "ss",
    "callback_upscaler_id": "cbu", "upscaled_url": "uu",
    "upscaled_file_path": "uf",
    "processing_started_at": "pst", "completed_at": "ca", "failed_at": "fa", "failure_reason": "fr",
    # refund
    "refund_id": "ri", "refund_amount_cents": "ra", "refunded_at": "rf",
    # download
    "download_token_hash": "tk", "download_token_hashes": "tks", "download_expires_at": "dx",
    "download_expired_at": "dxd",
}
FIELD_NAMES = {code: name for name, code in FIELD_CODES.items()}
# A side effect done ("done:email:ready" on a Job) is the field "+email:ready".
DONE_CODE = "+"

STATUS_CODES: dict[JobStatus, str] = {
    JobStatus.NEW: "n", JobStatus.AWAITING_PAYMENT: "a", JobStatus.PENDING: "p", JobStatus.PROCESSING: "r",
    JobStatus.COMPLETED: "c", JobStatus.FAILED: "f", JobStatus.ABANDONED: "b",
}
STATUS_BY_CODE = {code: status for status, code in STATUS_CODES.items()}
ACTOR_CODES: dict[str, str] = {
    Stage.CHECKOUT: "c", Stage.PROCESSOR: "p", Stage.NOTIFIER: "n", Stage.JANITOR: "j", Stage.GATEWAY: "g",
}
ACTOR_BY_CODE = {code: str(actor) for actor, code in ACTOR_CODES.items()}

assert len(FIELD_NAMES) == len(FIELD_CODES), "two fields share a code"
assert not any(code.startswith(DONE_CODE) for code in FIELD_NAMES)
assert set(STATUS_CODES) == set(JobStatus) and set(ACTOR_CODES) == set(Stage)


def field_code(name: str) -> str:
    return FIELD_CODES[name]


def encode_names(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping keyed by field names, keyed by their codes."""
    return {FIELD_CODES[name]: value for name, value in fields.items()}


def done_field(step: str) -> str:
    return DONE_CODE + step


def decode_hash(raw: Mapping[Any, Any], job_id: str) -> dict[str, Any]:
    """A job hash as HGETALL gives it, keyed by field names again (done markers as
    "done:<step>", as schemas.job.Job.from_redis reads them), with its job id."""
    out: dict[str, Any] = {"job_id": job_id}
    for k, v in raw.items():
        code = k.decode() if isinstance(k, bytes) else k
        if code.startswith(DONE_CODE):
            out[DONE_PREFIX + code[len(DONE_CODE):]] = v
        elif code in FIELD_NAMES:
            out[FIELD_NAMES[code]] = v
        # else: a field this version does not know (written by a newer one); ignored
    return out


# Base64 with its 64 characters in byte order: stored ids sort as the UUIDs' bytes
# do, and so as the UUIDs' text does (members "<ms>:<id>" of the status indexes
# break ties of a millisecond in job id order, as before the ids were compacted).
_B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SORTED = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_SORTED = bytes.maketrans(_B64URL, _SORTED)
_FROM_SORTED = bytes.maketrans(_SORTED, _B64URL)
_HEX_DIGITS = "0123456789abcdef"


def compact_id(value: str) -> str:
    """A job or event id as stored: a UUID in its canonical spelling as its 16
    bytes in 22 characters of base64 (URL-safe characters, in byte order; 14
    fewer), anything else as "=" + itself: one stored form per id, read back
    exactly by expand_id."""
    # The canonical spelling, checked by hand: uuid.UUID() took 5 us a call, and the
    # table calls this for every job it touches.
    digits = value.replace("-", "")
    if (len(value) != 36 or len(digits) != 32 or value[8] != "-" or value[13] != "-" or value[18] != "-"
            or value[23] != "-" or digits.strip(_HEX_DIGITS)):
        return "=" + value
    return base64.urlsafe_b64encode(bytes.fromhex(digits))[:22].translate(_TO_SORTED).decode("ascii")


def expand_id(stored: str) -> str:
    if stored.startswith("="):
        return stored[1:]
    try:
        if len(stored) != 22:
            raise ValueError("not 22 characters")
        raw = base64.b64decode(stored.encode("ascii").translate(_FROM_SORTED) + b"==", altchars=b"-_",
                               validate=True)
        return str(uuid.UUID(bytes=raw))
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise ValueError(f"not a stored id: {stored!r}") from exc


# The lookup hashes (keys.py) file a value under the first LOOKUP_DIGITS hex digits
# of its SHA-1: 112 bits, the most that fit Redis's 32-byte string class.
LOOKUP_DIGITS = 28


def lookup_field(value: str) -> str:
    """The field a value is filed under in a lookup hash (Lua: lookup_field)."""
    return hashlib.sha1(value.encode("utf-8")).hexdigest()[:LOOKUP_DIGITS]


def lua_constants() -> str:
    """The codes as Lua tables, prepended to every script: F.<field name> is the
    field's code, STATUS_CODE[<status>] a status's code in the history."""
    fields = ", ".join(f"{name} = '{code}'" for name, code in FIELD_CODES.items())
    statuses = ", ".join(f"{status.value} = '{code}'" for status, code in STATUS_CODES.items())
    return (f"local F = {{{fields}}}\nlocal DONE = '{DONE_CODE}'\nlocal STATUS_CODE = {{{statuses}}}\n"
            f"local LOOKUP_DIGITS = {LOOKUP_DIGITS}\n")
