"""Malformed messages for every topic a stage consumes (issue 7, bad-input suite):
Hypothesis strategies, and ``samples`` to draw a fixed, repeatable list of them
outside ``@given`` (a fixed seed, no example database, generation only).

Each strategy yields a ``BadMessage``: the raw value (bytes, or None for a
tombstone), what is wrong with it (``kind``, for failure messages), and which of
the topic's consumer groups must dead-letter it. Kinds of damage:

- not JSON, invalid UTF-8, JSON that is not an object, an empty value, a tombstone;
- JSON nested deeper than any parser should follow (up to 10,000 levels), at the
  top or inside a field;
- a required field missing or null, a field of the wrong type, a value out of range
  or outside an enumeration (unknown statuses, commands, resolutions), a field the
  model forbids, a string of up to ~200 KB, lone surrogates (``"\\ud800"``);
- well-formed messages that name a job the table does not have.

Every consumer of a topic must dead-letter a message it cannot parse. A message
that parses may still not be a stage's business, and then that stage lets it pass
without a dead letter while the other stage dead-letters it:

- ``jobs.commands``: ``retry`` is the processor's, ``resend_download`` the
  notifier's; a well-formed command for an unknown job is dead-lettered by its
  owner only.
- ``payments.events``: ``checkout.session.expired`` is the janitor's, every other
  handled type checkout's; an event of a type neither handles, or one that is not
  ours (``metadata.source``), is a Stripe event the pipeline ignores by design
  (Stripe sends many types), so it is in no one's ``dead_letter_by``.

The values are built by construction, not filtered through the stages' own
parsers; ``tests/e2e/test_bad_inputs.py`` checks every generated message against
the schemas, so a label that is wrong fails there, not as a mystery in a stage.

For the gateway: ``webhook_requests`` (a body that is no Stripe event and/or a
Stripe-Signature that does not hold, under any content type, with header bytes
an HTTP library would refuse to send) and ``download_tokens`` (guesses)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timezone
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

CHECKOUT, PROCESSOR, NOTIFIER, JANITOR = "checkout", "processor", "notifier", "janitor"

# Who consumes what (services/*/app.py): every consumer group of a topic sees every
# message on it.
CONSUMERS: dict[str, tuple[str, ...]] = {
    "jobs.requested": (CHECKOUT,),
    "payments.events": (CHECKOUT, JANITOR),
    "upscaler.events": (PROCESSOR,),
    "jobs.pending": (PROCESSOR,),
    "jobs.failed": (CHECKOUT, JANITOR),
    "jobs.completed": (NOTIFIER,),
    "payments.refunds": (NOTIFIER,),
    "jobs.expiring": (NOTIFIER,),
    "jobs.commands": (PROCESSOR, NOTIFIER),
}
INPUT_TOPICS = tuple(CONSUMERS)

# Kept in step with schemas/stripe_events.py (the sanity test checks).
HANDLED_STRIPE_TYPES = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
                        "checkout.session.async_payment_failed", "payment_intent.payment_failed",
                        "charge.refunded")
SESSION_EXPIRED = "checkout.session.expired"
OUR_SOURCE = "smi-pipeline"
MAX_HUGE_BYTES = 200_000


@dataclass(frozen=True)
class BadMessage:
    topic: str
    kind: str
    value: bytes | None
    dead_letter_by: frozenset[str]
    # False for a well-formed message refused for what it names (an unknown job):
    # the schema accepts it. None where it depends on the parser (JSON nested deep
    # inside a field that takes anything: parsed if the parser's stack allows). The
    # sanity test holds the generator to this.
    invalid: bool | None = True

    @property
    def passed_by(self) -> frozenset[str]:
        """Consumers that must let it pass, acked, without a dead letter."""
        return frozenset(CONSUMERS[self.topic]) - self.dead_letter_by


# -- drawing a fixed sample outside @given -------------------------------------------


def samples(strategy: st.SearchStrategy, count: int, *, seed_value: int = 20240607) -> list:
    """``count`` examples of ``strategy``, the same list on every run: a fixed seed,
    no example database, the generate phase only (no shrinking, no replay)."""
    found: list = []
    attempt = 0
    while len(found) < count:
        @seed(seed_value + attempt)
        @settings(max_examples=count - len(found), database=None, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(example):
            found.append(example)

        collect()
        attempt += 1
        if attempt > 50:
            raise RuntimeError(f"drew only {len(found)} of {count} examples")
    return found[:count]


# -- building blocks ----------------------------------------------------------------


def encode(value: Any, ensure_ascii: bool = True) -> bytes:
    """JSON bytes. Lone surrogates survive only as ``\\uXXXX`` escapes (the raw
    code point has no UTF-8 encoding), so non-ASCII output is used only without them."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, allow_nan=True).encode("utf-8")


def decodes_to_object(raw: bytes | None) -> bool:
    if raw is None:
        return False
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


ODD_STRINGS = ("", " ", "\x00", "\ud800", "a\udfffb", "\u202e", "🙂", "null", "{}", "\\", '"', "\n")
odd_text = st.text(max_size=24) | st.sampled_from(ODD_STRINGS)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | odd_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
containers = st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)
fractional = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))

# Values that are not of a type: pydantic's lax mode turns some inputs into others
# ("12" into 12, 1.0 into 1, true into 1.0, a unix time into a datetime), so each
# set holds only what no mode accepts.
NOT_STR = st.none() | st.booleans() | st.integers() | st.floats() | containers
NOT_INT_STRICT = st.none() | st.booleans() | st.floats() | odd_text | containers
NOT_INT_LAX = st.none() | fractional | st.text().filter(lambda s: not _numeric(s)) | containers
NOT_FLOAT = containers | st.text().filter(lambda s: not _numeric(s))
NOT_BOOL_STRICT = st.none() | st.integers() | st.floats() | odd_text | containers
NOT_BOOL_LAX = st.integers().filter(lambda i: i not in (0, 1)) | fractional | containers \
    | st.text().filter(lambda s: s.strip().lower() not in {"0", "1", "true", "false", "yes", "no", "on", "off",
                                                           "t", "f", "y", "n", "0.0", "1.0"})
NOT_DICT = st.none() | st.booleans() | st.integers() | st.floats() | odd_text | st.lists(scalars, max_size=3)
NOT_DATETIME = st.none() | st.booleans() | containers | st.sampled_from(
    ["", "yesterday", "2024-01-01T00:00:00", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z",
     "10000-01-01T00:00:00Z", "2024-01-01T25:00:00Z", "2024-01-01T00:00:00+25:00", "\ud800", "now"])


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def huge_text(min_bytes: int = 100_000, max_bytes: int = MAX_HUGE_BYTES) -> st.SearchStrategy[str]:
    """A string of min_bytes..max_bytes UTF-8 bytes (a short unit repeated: little
    entropy, so Hypothesis draws it as fast as a short one). No control characters:
    JSON escapes them sixfold, which would take the message past the broker's limit."""
    unit = st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=("Cs", "Cc")),
                   min_size=1, max_size=8)
    return st.builds(lambda u, n: u * max(1, n // len(u.encode())), unit, st.integers(min_bytes, max_bytes))


def nested(depth: int, kind: str) -> str:
    opener, closer = {"list": ("[", "]"), "object": ('{"a":', "}")}[kind]
    return opener * depth + "1" + closer * depth


NEST_MARK = "__bad_inputs_nested__"


def with_nested_field(value: dict, path: tuple[str, ...], depth: int, kind: str, ensure_ascii: bool) -> bytes:
    """``value`` as JSON with the field at ``path`` replaced by JSON ``depth`` deep."""
    value = _set(value, path, NEST_MARK)
    return encode(value, ensure_ascii).replace(json.dumps(NEST_MARK).encode(), nested(depth, kind).encode())


def _set(value: dict, path: tuple[str, ...], new: Any) -> dict:
    copy = dict(value)
    if len(path) == 1:
        copy[path[0]] = new
    else:
        copy[path[0]] = _set(copy.get(path[0]) if isinstance(copy.get(path[0]), dict) else {}, path[1:], new)
    return copy


def _drop(value: dict, path: tuple[str, ...]) -> dict:
    copy = dict(value)
    if len(path) == 1:
        copy.pop(path[0], None)
    elif isinstance(copy.get(path[0]), dict):
        copy[path[0]] = _drop(copy[path[0]], path[1:])
    return copy


INVALID_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xe2\x82", b"\xf8\x88\x80\x80\x80")

job_ids = st.uuids(version=4).map(str)
BAD_JOB_IDS = st.sampled_from(["", "not-a-job", "00000000-0000-0000-0000-000000000000", "\ud800",
                               "../../etc/passwd", "job:*"]) \
    | job_ids.map(str.upper) | job_ids.map(lambda j: j.replace("-", "")) | job_ids.map(lambda j: "{%s}" % j) \
    | st.uuids(version=1).map(str) | job_ids.map(lambda j: j + "\n")
rfc3339 = st.datetimes(timezones=st.just(timezone.utc)).map(
    lambda d: d.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


@dataclass(frozen=True)
class Field:
    """What can be wrong with one field of a model."""

    path: tuple[str, ...]
    wrong: st.SearchStrategy | None  # values of the wrong type, or of a bad value
    required: bool = False  # missing or null is wrong
    nullable: bool = False  # null is fine


@dataclass(frozen=True)
class Model:
    """A message shape: a strategy of well-formed values (``base``: value and the
    stages that dead-letter it even so, e.g. for naming an unknown job), its fields
    and the consumers that dead-letter anything malformed."""

    base: st.SearchStrategy  # of (dict, frozenset[str] dead-lettered by, str kind)
    fields: tuple[Field, ...]
    nest_paths: tuple[tuple[str, ...], ...]  # fields to nest JSON in: the type is wrong, or the job unknown
    huge_paths: tuple[tuple[str, ...], ...]  # fields to put ~200 KB in: the same
    forbids_extra: bool = False


# -- the models -------------------------------------------------------------------------

REQUEST_FIELDS = (
    Field(("request_id",), NOT_STR | st.sampled_from(["", "   ", "a b", "x" * 129, "é", "\x00", "\ud800"]),
          nullable=True),
    Field(("image_url",), NOT_STR | st.sampled_from([
        "", "not a url", "ftp://images.example.com/a.png", "file:///etc/passwd", "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data", "http://localhost/a.png", "http://[::1]/a.png",
        "http://0.0.0.0/a.png", "http://user:pw@images.example.com/a.png", "http://images.example.com:0/a.png",
        "javascript:alert(1)", "http:///a.png", "https://images.example.com/" + "a" * 2100,
        "http://192.168.1.1/a.png", "http://[fe80::1]/a.png", "http://images.example.com:99999/a.png"]),
          required=True),
    Field(("resolution",), NOT_STR | st.text(max_size=6).filter(lambda s: s.strip() not in ("2x", "4x", "8x"))
          | st.sampled_from(["3x", "16x", "4X", "1x", "x4"]), required=True),
    Field(("email",), NOT_STR | st.text(max_size=20).filter(lambda s: "@" not in s)
          | st.sampled_from(["a@", "@example.com", "a b@example.com", "a@@example.com"]), required=True),
    Field(("post_id",), NOT_INT_STRICT | st.integers(max_value=0), required=True),
    Field(("attachment_id",), NOT_INT_STRICT.filter(lambda v: v is not None) | st.integers(max_value=0),
          nullable=True),
    Field(("image_width",), NOT_INT_STRICT | st.integers(max_value=0) | st.integers(min_value=65_536),
          required=True),
    Field(("image_height",), NOT_INT_STRICT | st.integers(max_value=0) | st.integers(min_value=65_536),
          required=True),
    Field(("success_url",), NOT_STR.filter(lambda v: v is not None)
          | st.sampled_from(["javascript:alert(1)", "ftp://shop.example.com/", "not a url", "//", "http://",
                             "https://shop.example.com/" + "a" * 2100]), nullable=True),
    Field(("cancel_url",), NOT_STR.filter(lambda v: v is not None)
          | st.sampled_from(["javascript:alert(1)", "mailto:x@example.com", "http://"]), nullable=True),
)


@st.composite
def valid_requests(draw):
    body = {"request_id": "bad-" + draw(st.uuids()).hex, "image_url": "https://images.example.com/photo.jpg",
            "resolution": draw(st.sampled_from(["2x", "4x", "8x"])), "email": "buyer@example.com",
            "post_id": draw(st.integers(1, 10 ** 6)), "attachment_id": draw(st.none() | st.integers(1, 100)),
            "image_width": draw(st.integers(1, 4000)), "image_height": draw(st.integers(1, 4000)),
            "success_url": "https://shop.example.com/thanks", "cancel_url": "https://shop.example.com/cancel"}
    return body, frozenset(), "request"


REQUEST = Model(
    # A valid request is no bad input: every mutation below makes it invalid, so
    # the base is never sent as it is.
    base=valid_requests(),
    fields=REQUEST_FIELDS,
    nest_paths=(("email",), ("image_url",), ("post_id",), ("resolution",), ("image_width",)),
    # Any field: the whole request is then over checkout's 64 KiB limit.
    huge_paths=(("image_url",), ("email",), ("note",), ("request_id",)),
)


def _job_event_base(consumers: frozenset[str]):
    @st.composite
    def base(draw):
        event = {"event_id": str(draw(st.uuids())), "type": draw(st.sampled_from(
                     ["pending", "failed", "completed", "refunds", "expiring", "bogus", "COMPLETED", ""])
                     | st.text(max_size=12)),
                 "job_id": draw(job_ids), "occurred_at": draw(rfc3339), "version": 1,
                 "data": draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))}
        return event, consumers, "unknown job (type %r)" % event["type"][:20]
    return base()


JOB_EVENT_FIELDS = (
    Field(("event_id",), NOT_STR, required=True),
    Field(("type",), NOT_STR, required=True),
    Field(("job_id",), NOT_STR | BAD_JOB_IDS, required=True),
    Field(("occurred_at",), NOT_DATETIME, required=True),
    Field(("version",), st.sampled_from([0, 2, -1, 99, 2 ** 64, "1", "v1", None, [1], 1.5])),
    Field(("data",), NOT_DICT),
)


def job_event_model(topic: str) -> Model:
    return Model(base=_job_event_base(frozenset(CONSUMERS[topic])), fields=JOB_EVENT_FIELDS,
                 nest_paths=(("data", "deep"), ("job_id",), ("occurred_at",)),
                 huge_paths=(("job_id",), ("data", "note"), ("event_id",), ("type",)), forbids_extra=True)


@st.composite
def _command_base(draw):
    command = draw(st.sampled_from(["retry", "resend_download"]))
    body = {"command": command, "job_id": draw(job_ids), "requested_by": draw(st.text(min_size=1, max_size=40)),
            "force": draw(st.booleans())}
    if draw(st.booleans()):
        del body["force"]
    # Each command belongs to one stage; the other lets it pass.
    return body, frozenset({PROCESSOR if command == "retry" else NOTIFIER}), f"{command} for an unknown job"


COMMAND = Model(
    base=_command_base(),
    fields=(
        Field(("command",), NOT_STR | st.text(max_size=16).filter(lambda s: s not in ("retry", "resend_download"))
              | st.sampled_from(["RETRY", "delete", "retry ", "resend", "refund", "resend-download"]), required=True),
        Field(("job_id",), NOT_STR | BAD_JOB_IDS, required=True),
        Field(("requested_by",), NOT_STR | st.just("") | st.text(min_size=201, max_size=300), required=True),
        Field(("force",), NOT_BOOL_STRICT),
    ),
    nest_paths=(("requested_by",), ("job_id",), ("force",)),
    huge_paths=(("requested_by",), ("job_id",), ("command",)),
    forbids_extra=True,
)


@st.composite
def _upscaler_base(draw):
    body = {"job_id": draw(job_ids), "id": draw(st.text(max_size=20)),
            "status": draw(st.sampled_from(["IN_QUEUE", "IN_PROGRESS", "SUCCESS", "FAILED"])),
            "creditCost": draw(st.none() | st.floats(allow_nan=True)),
            "imageUrl": draw(st.none() | st.just("https://cdn.example.com/out.png")),
            "error": draw(st.none() | st.text(max_size=20)),
            draw(st.sampled_from(["resultPath", "extra", "x"])): draw(json_values)}
    return body, frozenset({PROCESSOR}), f"{body['status']} for an unknown job"


UPSCALER = Model(
    base=_upscaler_base(),
    fields=(
        Field(("job_id",), NOT_STR | BAD_JOB_IDS, required=True),
        Field(("id",), NOT_STR, required=True),
        Field(("status",), NOT_STR | st.text(max_size=12).filter(
            lambda s: s not in ("IN_QUEUE", "IN_PROGRESS", "SUCCESS", "FAILED"))
              | st.sampled_from(["DONE", "success", "FAILURE", "CANCELLED"]), required=True),
        Field(("creditCost",), NOT_FLOAT, nullable=True),
        Field(("imageUrl",), NOT_STR.filter(lambda v: v is not None), nullable=True),
        Field(("error",), NOT_STR.filter(lambda v: v is not None), nullable=True),
    ),
    # Extra fields are allowed: a deep or huge one leaves an unknown job.
    nest_paths=(("status",), ("job_id",), ("deep",)),
    huge_paths=(("id",), ("error",), ("job_id",), ("note",)),
)


@st.composite
def _stripe_base(draw):
    """A well-formed Stripe event, and who dead-letters it."""
    variant = draw(st.sampled_from(["handled-unknown-job", "handled-no-job-id", "expired-unknown-job",
                                    "expired-no-job-id", "unknown-type", "not-ours"]))
    event_type = {"handled-unknown-job": st.sampled_from(HANDLED_STRIPE_TYPES),
                  "handled-no-job-id": st.sampled_from(HANDLED_STRIPE_TYPES),
                  "expired-unknown-job": st.just(SESSION_EXPIRED), "expired-no-job-id": st.just(SESSION_EXPIRED),
                  "unknown-type": st.sampled_from(["invoice.paid", "customer.created", "checkout.session.Completed",
                                                   "", "\ud800"]) | st.text(max_size=30),
                  "not-ours": st.sampled_from(HANDLED_STRIPE_TYPES + (SESSION_EXPIRED,))}[variant]
    event_type = draw(event_type.filter(lambda t: variant != "unknown-type"
                                        or t not in HANDLED_STRIPE_TYPES + (SESSION_EXPIRED,)))
    job_id = draw(job_ids)
    metadata = {"source": OUR_SOURCE if variant != "not-ours" else draw(st.sampled_from(["another-shop", "", "SMI"])),
                "job_id": job_id}
    reference: str | None = job_id
    if variant.endswith("no-job-id"):
        del metadata["job_id"]
        reference = None
    obj = {"id": draw(st.sampled_from(["cs_test_1", "pi_test_1", "ch_test_1", "", "\ud800"]) | st.text(max_size=10)),
           "object": draw(st.sampled_from(["checkout.session", "payment_intent", "charge"])),
           "metadata": metadata, "client_reference_id": reference,
           "payment_status": draw(st.sampled_from(["paid", "unpaid", None])),
           "amount_total": draw(st.none() | st.integers(0, 10 ** 6)),
           "payment_intent": draw(st.none() | st.just("pi_test_1"))}
    event = {"id": draw(st.sampled_from(["evt_test_1", "", "\ud800", "evt \ud83d"]) | st.text(max_size=16)),
             "object": "event", "type": event_type, "created": draw(st.integers(0, 2 ** 31)),
             "livemode": False, "data": {"object": obj}}
    by = {"handled-unknown-job": {CHECKOUT}, "handled-no-job-id": {CHECKOUT}, "expired-unknown-job": {JANITOR},
          "expired-no-job-id": {JANITOR}, "unknown-type": set(), "not-ours": set()}[variant]
    return event, frozenset(by), f"stripe {variant}"


STRIPE = Model(
    base=_stripe_base(),
    fields=(
        Field(("id",), NOT_STR, required=True),
        Field(("type",), NOT_STR, required=True),
        Field(("created",), NOT_INT_LAX, required=True),
        Field(("livemode",), NOT_BOOL_LAX),
        Field(("data",), NOT_DICT, required=True),
        Field(("data", "object"), NOT_DICT, required=True),
        Field(("data", "object", "id"), NOT_STR, required=True),
        Field(("data", "object", "object"), NOT_STR, required=True),
        Field(("data", "object", "metadata"), NOT_DICT | st.dictionaries(
            st.sampled_from(["job_id", "source"]), st.none() | st.integers() | containers, min_size=1)),
        Field(("data", "object", "amount_total"), NOT_INT_LAX.filter(lambda v: v is not None), nullable=True),
        Field(("data", "object", "payment_intent"), st.integers() | st.floats() | st.lists(scalars, max_size=2),
              nullable=True),
        Field(("data", "object", "refunds"), NOT_DICT.filter(lambda v: v is not None), nullable=True),
        Field(("data", "object", "customer_details"), NOT_DICT.filter(lambda v: v is not None), nullable=True),
    ),
    nest_paths=(("data", "object", "metadata"), ("created",), ("id",)),
    # The id of a well-formed event: who dead-letters it does not change.
    huge_paths=(("id",), ("data", "object", "id")),
)


def model_for(topic: str) -> Model:
    if topic == "jobs.requested":
        return REQUEST
    if topic == "payments.events":
        return STRIPE
    if topic == "upscaler.events":
        return UPSCALER
    if topic == "jobs.commands":
        return COMMAND
    return job_event_model(topic)


# -- the strategies ---------------------------------------------------------------------


def categories(topic: str) -> dict[str, st.SearchStrategy[BadMessage]]:
    """One strategy per kind of damage, by name, for ``topic``."""
    model = model_for(topic)
    everyone = frozenset(CONSUMERS[topic])
    encodings = st.booleans()  # ASCII-only JSON, or UTF-8 as it is

    def malformed(kind: str, value: bytes | None) -> BadMessage:
        return BadMessage(topic, kind, value, everyone)

    @st.composite
    def not_json(draw):
        raw = draw(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
                   | st.sampled_from([b" ", b"{", b"}", b'{"a":', b"{'a': 1}", b'{"a":1,}', b"\x00",
                                      b'{"a":1}{"b":2}', b"NaN", b"\xef\xbb\xbf{}"]))
        if decodes_to_object(raw):
            raw = b"}" + raw
        return malformed("not JSON", raw)

    @st.composite
    def invalid_utf8(draw):
        value, _, _ = draw(model.base)
        raw = encode(value, draw(encodings))
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(INVALID_UTF8)) + raw[at:]
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return malformed("not UTF-8", raw)
        return malformed("not UTF-8", raw + b"\xff")

    @st.composite
    def non_object(draw):
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return malformed(f"JSON {type(value).__name__}", encode(value, draw(encodings)))

    @st.composite
    def deep_top(draw):
        depth, kind = draw(st.integers(2_000, 10_000)), draw(st.sampled_from(["list", "object"]))
        return malformed(f"nested {depth} deep", nested(depth, kind).encode())

    @st.composite
    def deep_field(draw):
        value, by, _ = draw(model.base)
        path = draw(st.sampled_from(model.nest_paths))
        depth, kind = draw(st.integers(2, 10_000)), draw(st.sampled_from(["list", "object"]))
        raw = with_nested_field(value, path, depth, kind, draw(encodings))
        # Inside a field that takes anything (JobEvent.data, UpscalerEvent's extra
        # fields) the message stays well-formed until the parser gives up on depth;
        # either way it names an unknown job.
        free = path[0] in ("data", "deep") and topic != "payments.events"
        return BadMessage(topic, f"{'.'.join(path)} nested {depth} deep", raw, by if free else everyone,
                          invalid=None if free else True)

    @st.composite
    def missing(draw):
        value, _, _ = draw(model.base)
        field = draw(st.sampled_from([f for f in model.fields if f.required]))
        return malformed(f"{'.'.join(field.path)} missing", encode(_drop(value, field.path), draw(encodings)))

    @st.composite
    def null(draw):
        value, _, _ = draw(model.base)
        field = draw(st.sampled_from([f for f in model.fields if not f.nullable]))
        return malformed(f"{'.'.join(field.path)} null", encode(_set(value, field.path, None), draw(encodings)))

    @st.composite
    def wrong(draw):
        value, _, _ = draw(model.base)
        field = draw(st.sampled_from([f for f in model.fields if f.wrong is not None]))
        bad = draw(field.wrong.filter(lambda v: v is not None) if field.nullable else field.wrong)
        return malformed(f"{'.'.join(field.path)} = {_short(bad)}", encode(_set(value, field.path, bad),
                                                                           draw(encodings)))

    @st.composite
    def extra(draw):
        value, _, _ = draw(model.base)
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in value) | st.just("\ud800"))
        value = {**value, name: draw(json_values)}
        return malformed(f"extra field {name!r}", encode(value, draw(encodings)))

    @st.composite
    def huge(draw):
        value, by, _ = draw(model.base)
        path = draw(st.sampled_from(model.huge_paths))
        text = draw(huge_text())
        raw = encode(_set(value, path, text), draw(encodings))
        if topic == "jobs.requested" or path[0] in ("job_id", "requested_by", "command"):
            by, invalid = everyone, True  # over checkout's 64 KiB, or a field the model bounds
        else:
            invalid = False
        return BadMessage(topic, f"{'.'.join(path)} of {len(text.encode())} bytes", raw, by, invalid=invalid)

    @st.composite
    def well_formed(draw):
        value, by, kind = draw(model.base)
        return BadMessage(topic, kind, encode(value, draw(encodings)), by, invalid=False)

    named: dict[str, st.SearchStrategy[BadMessage]] = {
        "tombstone": st.just(malformed("tombstone", None)),
        "empty": st.sampled_from([malformed("empty value", b""), malformed("whitespace", b" \n\t")]),
        "not-json": not_json(), "not-utf8": invalid_utf8(), "non-object": non_object(),
        "deep": deep_top(), "deep-field": deep_field(), "missing": missing(), "null": null(), "wrong": wrong(),
        "huge": huge(),
    }
    if model.forbids_extra:
        named["extra"] = extra()
    if model is not REQUEST:  # a well-formed request is a good one
        named["well-formed"] = well_formed()
    return named


# How often each category comes up in the mix, relative to the others: wrong values
# are the largest family; a huge string costs the broker ~150 KB, twice (the
# message and its dead letter), so it is 1 draw in about 40.
WEIGHTS = {"tombstone": 1, "empty": 1, "huge": 1, "wrong": 8, "well-formed": 4}
DEFAULT_WEIGHT = 3


def bad_messages(topic: str) -> st.SearchStrategy[BadMessage]:
    """The weighted mix of every category for ``topic``."""
    weighted = [strategy for name, strategy in categories(topic).items()
                for _ in range(WEIGHTS.get(name, DEFAULT_WEIGHT))]
    return st.sampled_from(weighted).flatmap(lambda strategy: strategy)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sample_bad_messages(topic: str, count: int, *, seed_value: int = 7) -> list[BadMessage]:
    """``count`` bad messages for ``topic``, the same on every run: one of every
    category first (so even a small run covers them all), then the weighted mix."""
    base = seed_value + INPUT_TOPICS.index(topic) * 1000
    first = [samples(strategy, 1, seed_value=base + i)[0] for i, strategy in enumerate(categories(topic).values())]
    rest = samples(bad_messages(topic), max(0, count - len(first)), seed_value=base + 500) if count > len(first) else []
    return (first + rest)[:count]


# -- HTTP: webhook requests the gateway must refuse ---------------------------------------


@dataclass(frozen=True)
class WebhookRequest:
    """A request for ``POST /webhooks/stripe`` that must get a 4xx and publish
    nothing: raw header lines (bytes, so they may hold what an HTTP library would
    refuse to send) besides Host, Content-Length and Connection."""

    kind: str
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]


def _sign(body: bytes, secret: str, timestamp: int) -> str:
    import hashlib
    import hmac

    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def webhook_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are no Stripe event: random bytes, and every malformed
    ``payments.events`` message above (what the gateway would otherwise publish)."""
    malformed = [strategy for name, strategy in categories("payments.events").items()
                 if name not in ("well-formed", "huge", "tombstone", "deep-field")]
    return st.binary(max_size=300) | st.sampled_from(malformed).flatmap(lambda s: s).map(lambda m: m.value)


CONTENT_TYPES = (b"application/json", b"application/json; charset=utf-8", b"Application/JSON", b"text/plain",
                 b"", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b"application/jsonp",
                 b"application/json, text/plain", b"*/*", b"application/\xff")


SIGNATURE_KINDS = ("no signature", "empty signature", "random signature", "printable signature",
                   "malformed signature", "signature with another secret", "signature of another body",
                   "signature too old", "random mac", "non-ASCII mac", "non-UTF-8 mac",
                   "non-ASCII mac, then a valid one", "valid signature")


@st.composite
def webhook_requests(draw, secret: str, now: int, signature_kind: str | None = None) -> WebhookRequest:
    """A request with a body that is no Stripe event or a signature that does not
    hold (or both), under a content type that may be wrong: always a 4xx.
    ``now`` is the signing time (Stripe's tolerance is 300 s); ``signature_kind``
    one of SIGNATURE_KINDS, or any."""
    body = draw(webhook_bodies())
    mac = _sign(body, secret, now)
    other = draw(st.integers(0, 2 ** 64))
    signatures: dict[str, st.SearchStrategy[bytes | None]] = {
        "no signature": st.none(),
        "empty signature": st.just(b""),
        "random signature": st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b),
        "printable signature": st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=120)
        .map(str.encode),
        "malformed signature": st.sampled_from([
            b"t=", b"v1=" + mac.encode(), f"t={now}".encode(), f"t=abc,v1={mac}".encode(), b",,,", b"=", b"t==,v1==",
            f"t={now},v0={mac}".encode(), f"t={'9' * 5000},v1={mac}".encode(), f"t={now},v1=".encode(),
            f"t={now} ,v1={mac}".encode(), f"t={now},v1={mac.upper()}".encode(), f"t=-{now},v1={mac}".encode()]),
        "signature with another secret": st.just(f"t={now},v1={_sign(body, secret + 'x', now)}".encode()),
        "signature of another body": st.just(f"t={now},v1={_sign(body + b' ', secret, now)}".encode()),
        "signature too old": st.just(f"t={now - 301},v1={_sign(body, secret, now - 301)}".encode()),
        "random mac": st.just(f"t={now},v1={other:064x}".encode()),
        "non-ASCII mac": st.sampled_from(["é", "\u0660" * 64, "ÿ" * 64]).map(lambda m: f"t={now},v1={m}".encode()),
        "non-UTF-8 mac": st.just(f"t={now},v1=".encode() + b"\xff" * 64),
        "non-ASCII mac, then a valid one": st.just(f"t={now},v1=é,v1={mac}".encode()),
        "valid signature": st.just(f"t={now},v1={mac}".encode()),
    }
    assert set(signatures) == set(SIGNATURE_KINDS)
    signature_kind = signature_kind or draw(st.sampled_from(SIGNATURE_KINDS))
    signature = draw(signatures[signature_kind])
    content_type = draw(st.sampled_from(CONTENT_TYPES) | st.none())
    headers = []
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    if signature is not None:
        headers.append((b"Stripe-Signature", signature))
    if draw(st.integers(0, 9)) == 0:  # a second signature header
        headers.append((b"Stripe-Signature", f"t={now},v1={mac}".encode()))
    noise = draw(st.integers(0, 9)) == 0
    if noise:  # a header the HTTP parser itself may refuse (too long, control bytes), or a stray encoding
        headers.append((draw(st.sampled_from([b"X-Fuzz", b"Stripe-Signature-2", b"Content-Encoding"])),
                        draw(st.sampled_from([b"gzip", b"\x00", b"a" * 9000, "é".encode(), b"\x7f"]))))
    kind = f"{signature_kind}, content type {content_type!r}, {len(body)} byte body{', header noise' * noise}"
    return WebhookRequest(kind, body, tuple(headers))


def download_tokens() -> st.SearchStrategy[str]:
    """Guesses at download tokens: well-formed (64 letters and digits) and not.
    Never empty and never only dots: those do not reach the route at all."""
    alnum = st.characters(codec="ascii", categories=("Lu", "Ll", "Nd"))
    return (st.text(alphabet=alnum, min_size=64, max_size=64)
            | st.text(min_size=1, max_size=100).filter(lambda t: "/" not in t and t.strip(".") != "")
            | st.text(alphabet=alnum, min_size=1, max_size=200))
