"""fetch_to_file over real HTTP on loopback: the public-address rule on the URL, on
every address a name resolves to and on every redirect, checked before connecting;
size and magic-byte checks that never leave a partial file; and error classes."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from PIL import Image

from schemas.urls import NO_EXEMPTIONS, HostAllowList, UnsafeURL
from smi.errors import PermanentError, TransientError
from smi.fetch import BlockedURL, FetchRejected, fetch_to_file
from tests.support.image_server import ImageServer, make_image

# Only loopback is exempt: the image server is reachable, 10.x and 169.254.x are not.
LOOPBACK = HostAllowList.parse("127.0.0.1/32")
MiB = 1024 * 1024


@dataclass
class TracedSession:
    """A real aiohttp session that records every request it starts."""

    session: aiohttp.ClientSession
    requested: list[str]


@pytest.fixture
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture
async def traced():
    requested: list[str] = []

    async def on_request_start(session, context, params):
        requested.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield TracedSession(session, requested)


def static_resolver(table: dict[str, list[str]]):
    calls: list[str] = []

    async def resolve(host: str) -> list[str]:
        calls.append(host)
        return table[host]

    resolve.calls = calls
    return resolve


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


@pytest.mark.parametrize("kind, extension", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
async def test_an_image_is_fetched_and_kept(images, tmp_path, kind, extension):
    dest = tmp_path / "in" / "source"
    fetched = await fetch_to_file(f"{images.url}/img/64x48.{extension}", dest, max_bytes=MiB, allow=LOOPBACK)
    assert (fetched.path, fetched.kind) == (dest, kind)
    assert fetched.size == dest.stat().st_size == len(make_image(64, 48, extension))
    assert fetched.content_type.startswith("image/")
    with Image.open(dest) as image:
        assert image.size == (64, 48)
    assert leftovers(dest.parent) == ["source"]  # no temp file beside it


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img/8x8.png",
    "http://10.0.0.1/img/8x8.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/img/8x8.png",
    "http://localhost:{port}/img/8x8.png",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/_GET",
])
async def test_unsafe_urls_are_rejected_before_any_connection(images, traced, tmp_path, url):
    with pytest.raises(UnsafeURL) as raised:
        await fetch_to_file(url.format(port=images.port), tmp_path / "x", max_bytes=MiB, allow=NO_EXEMPTIONS,
                            session=traced.session)
    assert isinstance(raised.value, PermanentError)
    assert traced.requested == [] and images.hits == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("host, addresses, reason", [
    ("evil.test", ["10.0.0.1"], "address 10.0.0.1 is not public"),
    ("mixed.test", ["93.184.216.34", "10.0.0.1"], "address 10.0.0.1 is not public"),
    ("metadata.test", ["169.254.169.254"], "address 169.254.169.254 is not public"),
    ("v6.test", ["2606:4700::1111", "fd00::1"], "address fd00::1 is not public"),
])
async def test_a_name_that_resolves_to_any_private_address_is_rejected(traced, tmp_path, host, addresses, reason):
    resolve = static_resolver({host: addresses})
    with pytest.raises(BlockedURL, match=reason):
        await fetch_to_file(f"http://{host}/a.png", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK,
                            resolver=resolve, session=traced.session)
    assert traced.requested == []


async def test_a_name_resolving_to_loopback_needs_an_exemption(images, traced, tmp_path):
    resolve = static_resolver({"images.test": ["127.0.0.1"]})
    with pytest.raises(BlockedURL, match="127.0.0.1 is not public"):
        await fetch_to_file(f"http://images.test:{images.port}/img/8x8.png", tmp_path / "x", max_bytes=MiB,
                            allow=NO_EXEMPTIONS, resolver=resolve, session=traced.session)
    assert traced.requested == [] and images.hits == []


async def test_an_allow_listed_host_name_is_exempt(images, tmp_path):
    resolve = static_resolver({"images.test": ["127.0.0.1"]})
    fetched = await fetch_to_file(f"http://images.test:{images.port}/img/8x8.png", tmp_path / "x",
                                  max_bytes=MiB, allow=HostAllowList.parse("images.test"), resolver=resolve)
    assert fetched.kind == "png"


async def test_the_connection_goes_to_the_vetted_address_with_the_original_host(images, traced, tmp_path):
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding DNS: allowed first, private after

    async def rebinding(host: str) -> list[str]:
        return next(answers)

    signed = "/img/8x8.png?sig=a%2Fb%3D%3D&exp=%7E1"  # sent byte for byte, as a signature needs
    fetched = await fetch_to_file(f"http://images.test:{images.port}{signed}", tmp_path / "x",
                                  max_bytes=MiB, allow=LOOPBACK, resolver=rebinding, session=traced.session)
    assert fetched.kind == "png"
    assert next(answers) == ["10.0.0.1"]  # resolved exactly once
    assert traced.requested == [f"http://127.0.0.1:{images.port}{signed}"]
    assert [(hit.path_qs, hit.host) for hit in images.hits] == [(signed, f"images.test:{images.port}")]


@pytest.mark.parametrize("target, reason", [
    ("http://169.254.169.254/latest/meta-data/iam/", "address 169.254.169.254 is not public"),
    ("http://10.0.0.1/internal.png", "address 10.0.0.1 is not public"),
    ("http://evil.test/a.png", "host evil.test: address 10.0.0.1 is not public"),
    ("file:///etc/passwd", "scheme must be http or https"),
])
async def test_a_redirect_to_a_private_address_is_rejected_without_connecting(images, traced, tmp_path,
                                                                                target, reason):
    start = f"{images.url}/redirect?to={quote(target, safe='')}"
    with pytest.raises(BlockedURL, match=reason):
        await fetch_to_file(start, tmp_path / "x", max_bytes=MiB, allow=LOOPBACK,
                            resolver=static_resolver({"evil.test": ["10.0.0.1"]}), session=traced.session)
    assert traced.requested == [start]  # the redirect itself, and nothing after it
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_relative_redirect_is_followed(images, tmp_path, code):
    start = f"{images.url}/redirect?code={code}&to={quote('/img/8x8.png', safe='')}"
    fetched = await fetch_to_file(start, tmp_path / "x", max_bytes=MiB, allow=LOOPBACK)
    assert fetched.kind == "png"
    assert [hit.path_qs.split("?")[0] for hit in images.hits] == ["/redirect", "/img/8x8.png"]


async def test_redirects_are_counted(images, tmp_path):
    fetched = await fetch_to_file(f"{images.url}/hops/3", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK,
                                  max_redirects=3)
    assert fetched.kind == "png"
    with pytest.raises(FetchRejected, match="too many redirects"):
        await fetch_to_file(f"{images.url}/hops/4", tmp_path / "y", max_bytes=MiB, allow=LOOPBACK,
                            max_redirects=3)
    assert images.count("/hops/0") == 1  # the second fetch stopped at /hops/1
    assert leftovers(tmp_path) == ["x"]


@pytest.mark.parametrize("in_memory_up_to", [0, MiB // 4])  # the second spills to a file, then fails
@pytest.mark.parametrize("declare, reason", [(False, "more than 1048576 bytes"), (True, "2097152 bytes declared")])
async def test_an_oversized_body_is_refused_and_leaves_no_file(images, tmp_path, declare, reason, in_memory_up_to):
    url = f"{images.url}/big?size={2 * MiB}&declare={int(declare)}"
    with pytest.raises(FetchRejected, match=f"too large: {reason}"):
        await fetch_to_file(url, tmp_path / "x", max_bytes=MiB, allow=LOOPBACK, in_memory_up_to=in_memory_up_to)
    assert leftovers(tmp_path) == []


async def test_a_small_image_comes_back_in_memory_and_nothing_is_written(images, tmp_path):
    dest = tmp_path / "in" / "source"
    fetched = await fetch_to_file(f"{images.url}/img/64x48.png", dest, max_bytes=MiB, allow=LOOPBACK,
                                  in_memory_up_to=MiB)
    assert (fetched.path, fetched.kind, fetched.data) == (None, "png", make_image(64, 48, "png"))
    assert fetched.size == len(fetched.data)
    assert not (tmp_path / "in").exists()  # not even the directory


@pytest.mark.parametrize("declare", [False, True])  # undeclared: found too big halfway, what was held goes first
@pytest.mark.parametrize("size, limit, in_memory", [(200_000, 200_000, True), (200_001, 200_000, False),
                                                    (300_000, 100, False)])
async def test_a_body_over_the_memory_limit_goes_to_the_file_whole(images, tmp_path, declare, size, limit, in_memory):
    dest = tmp_path / "in" / "source"
    fetched = await fetch_to_file(f"{images.url}/big?size={size}&declare={int(declare)}", dest, max_bytes=MiB,
                                  allow=LOOPBACK, in_memory_up_to=limit)
    expected = b"\x89PNG\r\n\x1a\n" + bytes(size - 8)  # what /big sends
    assert fetched.size == size and fetched.kind == "png"
    if in_memory:
        assert (fetched.path, fetched.data) == (None, expected)
        assert not dest.parent.exists()
    else:
        assert (fetched.path, fetched.data) == (dest, None)
        assert dest.read_bytes() == expected
        assert leftovers(dest.parent) == ["source"]


@pytest.mark.parametrize("durable", [True, False])
async def test_a_durable_fetch_is_on_disk_before_it_is_named(images, tmp_path, monkeypatch, durable):
    # fsync is recorded (which file, whether the final name existed yet), then done.
    dest = tmp_path / "in" / "result"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), dest.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fetched = await fetch_to_file(f"{images.url}/img/64x48.png", dest, max_bytes=MiB, allow=LOOPBACK,
                                  durable=durable)
    assert fetched.path == dest and dest.read_bytes() == make_image(64, 48, "png")
    if durable:
        [(path, named_yet)] = synced
        assert Path(path).parent == dest.parent and Path(path).name.endswith(".part") and not named_yet
    else:
        assert synced == []
    assert leftovers(dest.parent) == ["result"]


async def test_a_body_that_is_not_an_image_is_refused_and_leaves_no_file(images, tmp_path):
    with pytest.raises(FetchRejected, match=r"not an image \(content type text/plain"):
        await fetch_to_file(f"{images.url}/text", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK)
    assert leftovers(tmp_path) == []


async def test_an_image_of_a_kind_not_accepted_is_refused(images, tmp_path):
    with pytest.raises(FetchRejected, match=r"not an image of an accepted kind \(webp"):
        await fetch_to_file(f"{images.url}/img/8x8.webp", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK,
                            allowed_kinds=("png", "jpeg"))
    assert leftovers(tmp_path) == []


async def test_a_failed_fetch_leaves_an_earlier_file_alone(images, tmp_path):
    dest = tmp_path / "x"
    dest.write_bytes(b"earlier")
    with pytest.raises(FetchRejected):
        await fetch_to_file(f"{images.url}/text", dest, max_bytes=MiB, allow=LOOPBACK)
    assert dest.read_bytes() == b"earlier"


@pytest.mark.parametrize("code, error", [(404, FetchRejected), (403, FetchRejected), (410, FetchRejected),
                                         (503, TransientError), (500, TransientError), (429, TransientError)])
async def test_http_errors_are_classified(images, tmp_path, code, error):
    with pytest.raises(error, match=f"HTTP {code}") as raised:
        await fetch_to_file(f"{images.url}/status/{code}", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK)
    assert isinstance(raised.value, PermanentError) == (error is FetchRejected)


async def test_a_slow_server_times_out_as_transient(images, tmp_path):
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        await fetch_to_file(f"{images.url}/slow?seconds=5", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK,
                            timeout=0.3)
    assert time.monotonic() - started < 2
    assert leftovers(tmp_path) == []


async def test_a_refused_connection_is_transient(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError, match="cannot connect"):
        await fetch_to_file(f"http://127.0.0.1:{port}/a.png", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK)


async def test_query_strings_stay_out_of_errors_and_logs(images, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="smi.fetch")
    await fetch_to_file(f"{images.url}/img/8x8.png?token=s3cret", tmp_path / "x", max_bytes=MiB, allow=LOOPBACK)
    with pytest.raises(FetchRejected) as raised:
        await fetch_to_file(f"{images.url}/status/404?token=s3cret", tmp_path / "y", max_bytes=MiB, allow=LOOPBACK)
    assert "/img/8x8.png" in caplog.text and "/status/404" in str(raised.value)
    assert "s3cret" not in caplog.text and "s3cret" not in str(raised.value)
