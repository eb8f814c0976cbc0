"""JobRequest validation (design.md, "Topics": JobRequest). Everything goes through
``parse_job_request(raw_bytes, policy)``, the way checkout reads ``jobs.requested``."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from schemas.requests import (
    MAX_DIMENSION,
    MAX_REQUEST_BYTES,
    InvalidMessage,
    JobRequest,
    RequestPolicy,
    parse_job_request,
    plain_email,
)
from schemas.urls import HostAllowList

VALID = {
    "request_id": "wp-42-attachment-7-4x",
    "image_url": "https://images.example.com/uploads/2025/01/photo.jpg",
    "resolution": "4x",
    "email": "customer@example.com",
    "post_id": 42,
    "attachment_id": 7,
    "image_width": 2000,
    "image_height": 1500,
    "success_url": "https://shop.example.com/thanks",
    "cancel_url": "https://shop.example.com/cancelled",
}
REQUIRED = ("image_url", "resolution", "email", "post_id", "image_width", "image_height")
OPTIONAL = ("request_id", "attachment_id", "success_url", "cancel_url")


def raw(**changes) -> bytes:
    data = dict(VALID)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


def parse(policy: RequestPolicy = RequestPolicy(), **changes) -> JobRequest:
    return parse_job_request(raw(**changes), policy)


def rejected(policy: RequestPolicy = RequestPolicy(), **changes) -> str:
    with pytest.raises(InvalidMessage) as info:
        parse(policy, **changes)
    assert info.value.reason == str(info.value)
    assert info.value.reason
    return info.value.reason


def test_valid_request_parses_with_every_field():
    req = parse()
    assert req.request_id == "wp-42-attachment-7-4x"
    assert req.image_url == VALID["image_url"]
    assert req.resolution == "4x"
    assert req.factor == 4
    assert req.email == "customer@example.com"
    assert (req.post_id, req.attachment_id) == (42, 7)
    assert (req.image_width, req.image_height) == (2000, 1500)
    assert req.success_url == VALID["success_url"]
    assert req.cancel_url == VALID["cancel_url"]


def test_str_input_parses_too():
    assert parse_job_request(raw().decode()).post_id == 42


def test_optional_fields_may_be_absent():
    req = parse(**{name: ... for name in OPTIONAL})
    assert req.request_id is None
    assert req.attachment_id is None
    assert req.success_url is None
    assert req.cancel_url is None


@pytest.mark.parametrize("name", REQUIRED)
def test_required_fields(name):
    reason = rejected(**{name: ...})
    assert name in reason
    assert "required" in reason.lower()


def test_unknown_fields_are_ignored():
    assert parse(some_future_field={"x": 1}).post_id == 42


# --- request_id ----------------------------------------------------------------

def test_request_id_up_to_128_chars():
    assert parse(request_id="r" * 128).request_id == "r" * 128


def test_request_id_of_129_chars_rejected():
    assert "request_id" in rejected(request_id="r" * 129)


@pytest.mark.parametrize("bad", ["", 42, ["a"]])
def test_request_id_must_be_a_nonempty_string(bad):
    assert "request_id" in rejected(request_id=bad)


# --- image_url -------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://images.example.com/a.png", "https://images.example.com/a.png",
                                 "HTTPS://images.example.com/a.png", "https://93.184.216.34/a.jpg",
                                 "https://images.example.com:8443/a.png?size=full"])
def test_http_and_https_image_urls_accepted(url):
    assert parse(image_url=url).image_url == url


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://images.example.com/1", "ftp://images.example.com/a.png",
                                 "javascript:alert(1)", "data:image/png;base64,AAAA", "//images.example.com/a.png",
                                 "images.example.com/a.png", "https://", "http:///a.png"])
def test_other_schemes_and_hostless_urls_rejected(url):
    assert "image_url" in rejected(image_url=url)


def test_scheme_reason_is_helpful():
    assert "http or https" in rejected(image_url="file:///etc/passwd")


NON_PUBLIC = ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "[::1]", "[fe80::1]",
              "[::ffff:127.0.0.1]", "0.0.0.0", "100.64.0.1", "224.0.0.1", "[fc00::1]", "255.255.255.255"]


@pytest.mark.parametrize("host", NON_PUBLIC)
def test_literal_non_public_addresses_rejected(host):
    reason = rejected(image_url=f"http://{host}/latest/meta-data/")
    assert "image_url" in reason
    assert "not public" in reason


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "localhost.", "api.localhost", "localhost.localdomain"])
def test_localhost_names_rejected(host):
    assert "not public" in rejected(image_url=f"http://{host}:8080/a.png")


@pytest.mark.parametrize("url", ["https://user:pass@images.example.com/a.png", "https://images.example.com:0/a.png",
                                 "https://images.example.com:99999/a.png"])
def test_credentials_and_bad_ports_rejected(url):
    assert "image_url" in rejected(image_url=url)


def test_overlong_url_rejected():
    assert "image_url" in rejected(image_url="https://images.example.com/" + "a" * 2100)


ALLOW = RequestPolicy(allow_hosts=HostAllowList.parse("127.0.0.0/8,imagehost.test"))


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/a.png", "http://127.1.2.3/a.png", "http://imagehost.test/a.png",
                                 "http://IMAGEHOST.test./a.png"])
def test_allow_hosts_exempts_listed_hosts_and_networks(url):
    assert parse(ALLOW, image_url=url).image_url == url


def test_allow_hosts_is_narrow():
    # Exempting 127.0.0.0/8 does not exempt other private ranges or localhost.
    assert "not public" in rejected(ALLOW, image_url="http://10.0.0.1/a.png")
    assert "not public" in rejected(ALLOW, image_url="http://169.254.169.254/a.png")
    assert "not public" in rejected(ALLOW, image_url="http://localhost/a.png")


def test_allow_hosts_exempts_a_named_host():
    policy = RequestPolicy(allow_hosts=HostAllowList.parse("localhost"))
    assert parse(policy, image_url="http://localhost:9000/a.png").image_url == "http://localhost:9000/a.png"
    assert "not public" in rejected(policy, image_url="http://127.0.0.1/a.png")


def test_host_allow_list_parse():
    allow = HostAllowList.parse(" 127.0.0.0/8 , imagehost.test,,10.1.2.3 ")
    assert allow.allows_host("imagehost.test")
    assert allow.allows_host("ImageHost.Test.")
    assert not allow.allows_host("other.test")
    import ipaddress
    assert allow.allows_address(ipaddress.ip_address("127.9.9.9"))
    assert allow.allows_address(ipaddress.ip_address("10.1.2.3"))
    assert not allow.allows_address(ipaddress.ip_address("10.1.2.4"))
    assert HostAllowList.parse(["imagehost.test"]).allows_host("imagehost.test")
    assert HostAllowList.parse(None) == HostAllowList()


# --- resolution ------------------------------------------------------------------

@pytest.mark.parametrize("resolution", ["2x", "4x", "8x"])
def test_default_resolutions(resolution):
    assert parse(resolution=resolution).resolution == resolution


@pytest.mark.parametrize("resolution", ["16x", "3x", "4", "x4", "", "4X", 4])
def test_resolutions_outside_the_default_set_rejected(resolution):
    assert "resolution" in rejected(resolution=resolution)


def test_configured_resolution_set():
    policy = RequestPolicy(resolutions=("4x", "8x"))
    reason = rejected(policy, resolution="2x")
    assert "resolution" in reason
    assert "4x" in reason and "8x" in reason  # says what is offered
    assert parse(policy, resolution="8x").factor == 8


# --- email -----------------------------------------------------------------------

@pytest.mark.parametrize("email", ["not-an-email", "a@b", "alice@@example.com", "", "alice@", "@example.com",
                                   "alice example@example.com", "alice@exa mple.com", "alice@example..com"])
def test_bad_email_rejected(email):
    assert "email" in rejected(email=email)


@pytest.mark.parametrize("email", ["jane.q.customer@@example.com", "jane.q.customer@mailhost",
                                   "jane.q.customer@example.invalid", "jane.q.customer.@example.com",
                                   "jane q customer@example.com", "jane.q.customer@-example.com",
                                   "jane.q.customer@secret-domain-example.local"])
def test_email_reason_never_contains_the_email(email):
    reason = rejected(email=email)
    assert "email" in reason
    assert email not in reason
    assert "jane" not in reason
    assert "customer@" not in reason
    assert "secret-domain" not in reason
    assert "mailhost" not in reason


def test_email_must_be_a_string():
    assert "email" in rejected(email=["customer@example.com"])


# --- integers --------------------------------------------------------------------

INT_FIELDS = ("post_id", "attachment_id", "image_width", "image_height")


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("bad", ["100", 1.5, 1.0, True, False, 0, -1, None, [1]])
def test_ints_are_strictly_positive_ints(name, bad):
    if bad is None and name == "attachment_id":
        assert parse(attachment_id=None).attachment_id is None  # optional: null is absent
        return
    assert name in rejected(**{name: bad})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_one_is_the_smallest_int(name):
    assert getattr(parse(**{name: 1}), name) == 1


@pytest.mark.parametrize("name", ["image_width", "image_height"])
def test_dimensions_up_to_max(name):
    assert MAX_DIMENSION == 65_535
    assert getattr(parse(**{name: MAX_DIMENSION}), name) == MAX_DIMENSION
    assert name in rejected(**{name: MAX_DIMENSION + 1})


# --- browser URLs ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["success_url", "cancel_url"])
def test_browser_urls_http_or_https(name):
    assert getattr(parse(**{name: "http://localhost:8000/thanks"}), name) == "http://localhost:8000/thanks"
    assert name in rejected(**{name: "javascript:alert(1)"})
    assert name in rejected(**{name: "ftp://shop.example.com/"})
    assert name in rejected(**{name: "file:///tmp/x"})
    assert name in rejected(**{name: "not a url"})


# --- the message itself ----------------------------------------------------------

def _reason(payload) -> str:
    with pytest.raises(InvalidMessage) as info:
        parse_job_request(payload, RequestPolicy())
    return info.value.reason


def test_not_json():
    assert "not JSON" in _reason(b"this is not json")
    assert "not JSON" in _reason(b"")
    assert "not JSON" in _reason(b'{"image_url": ')


@pytest.mark.parametrize("payload,kind", [(b"[1, 2, 3]", "list"), (b'"hello"', "str"), (b"42", "int"), (b"null", "NoneType")])
def test_json_that_is_not_an_object(payload, kind):
    reason = _reason(payload)
    assert "JSON object" in reason
    assert kind in reason


def test_invalid_utf8():
    reason = _reason(b'{"email": "\xff\xfe"}')
    assert "UTF-8" in reason


def test_over_the_size_limit():
    payload = raw(padding="x" * MAX_REQUEST_BYTES)
    assert len(payload) > MAX_REQUEST_BYTES
    reason = _reason(payload)
    assert "exceeds" in reason
    assert str(MAX_REQUEST_BYTES) in reason


def test_just_under_the_size_limit_is_fine():
    base = raw(padding="")
    payload = raw(padding="x" * (MAX_REQUEST_BYTES - len(base)))
    assert len(payload) == MAX_REQUEST_BYTES
    assert parse_job_request(payload).post_id == 42


def test_deeply_nested_json_100000_levels():
    reason = _reason(b"[" * 100_000)  # over the size limit before it is parsed at all
    assert reason


def test_deeply_nested_json_within_the_size_limit():
    assert "nested too deeply" in _reason(b"[" * 50_000)
    assert "nested too deeply" in _reason(b'{"a":' * 10_000 + b"1" + b"}" * 10_000)


def test_many_errors_are_all_reported():
    reason = _reason(raw(post_id="1", image_width=0, image_url="file:///x"))
    assert "post_id" in reason and "image_width" in reason and "image_url" in reason


def test_dict_input_is_validated_the_same_way():
    with pytest.raises(InvalidMessage):
        parse_job_request({**VALID, "post_id": "42"})
    assert parse_job_request(dict(VALID)).post_id == 42


# --- the plain-address shortcut (schemas/requests.plain_email) ---------------------

_ADDRESS_CHARS = "abcXYZ019.!#$%&'*+/=?^_`{|}~-@\"(),:;<>[\\] \u00e9\u0431"


def _reference(address: str) -> str | None:
    """What pydantic's EmailStr check gives (email-validator): the normalized address,
    or None when it refuses."""
    from pydantic.networks import validate_email
    from pydantic_core import PydanticCustomError

    try:
        return validate_email(address)[1]
    except PydanticCustomError:
        return None


@settings(max_examples=1500, deadline=None)
@given(st.one_of(
    st.emails(),
    st.text(alphabet=_ADDRESS_CHARS, min_size=1, max_size=40),
    st.builds(lambda local, labels: f"{local}@{'.'.join(labels)}",
              st.text(alphabet="aZ9.-_+", min_size=1, max_size=70),
              st.lists(st.text(alphabet="aZ9-", min_size=1, max_size=66), min_size=1, max_size=4)),
))
def test_the_shortcut_takes_only_what_email_validator_takes_and_gives_the_same(address):
    fast = plain_email(address)
    if fast is not None:
        assert _reference(address) == fast


@pytest.mark.parametrize("address", ["Customer@EXAMPLE.com", "a.b+tag@mail.example.co.uk", "x_y@sub-domain.example.org"])
def test_plain_addresses_take_the_shortcut(address):
    assert plain_email(address) == _reference(address) is not None


@pytest.mark.parametrize("address", ["a@b.localhost", "a@x.test", "a@xn--nxasmq6b.com", "Jane <j@example.com>",
                                     "\u00e9@example.com", '"a b"@example.com', "a..b@example.com", f"{'a' * 65}@example.com"])
def test_everything_else_goes_to_email_validator(address):
    assert plain_email(address) is None
