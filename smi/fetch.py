"""SSRF-safe fetching of image URLs: http/https only, every address a hostname
resolves to must be public (schemas.urls), redirects are followed by hand and each
hop is checked the same way before any connection is made.

DNS rebinding: a name is resolved once per hop, the addresses are vetted, and the
connection goes to a vetted address by IP (Host header and TLS server name keep
the original host), so a second, different answer from DNS is never used.

URLs may carry signed tokens in their query string: logs and error messages show
scheme, host and path only (``redact``)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, BinaryIO, Callable, Iterable

import aiohttp
from yarl import URL

from schemas.urls import HostAllowList, UnsafeURL, check_address, check_url, literal_ip
from smi.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]

IMAGE_KINDS = ("png", "jpeg", "webp")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUSES = frozenset({408, 425, 429})
SNIFF_BYTES = 12  # enough for the longest signature (WebP: RIFF....WEBP)
CHUNK_BYTES = 64 * 1024
USER_AGENT = "smi-pipeline/fetch"


class FetchRejected(PermanentError):
    """The resource can be reached but will never be accepted: 4xx, too large, not
    an image of an accepted kind, too many redirects."""


class BlockedURL(UnsafeURL, PermanentError):
    """An UnsafeURL that the stages' retry loop also recognises as permanent."""


@dataclass(frozen=True)
class FetchedFile:
    """A fetched image: in the file ``path``, or (a body small enough, when the
    caller allowed it) in ``data``, with ``path`` None and nothing written."""
    path: Path | None
    kind: str
    size: int
    content_type: str | None
    data: bytes | None = None


def sniff_image_kind(head: bytes) -> str | None:
    """The image kind by its magic bytes, never by the server's Content-Type."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def parse_url(url: str) -> URL:
    """yarl's reading of ``url`` (yarl is the parser aiohttp connects with). A URL
    that is already plain ASCII keeps its percent-encoding byte for byte, as a
    signed URL must; anything else is encoded the way aiohttp would."""
    if url.isascii() and url.isprintable() and " " not in url:
        return URL(url, encoded=True)
    return URL(url)


def redact(url: str | URL) -> str:
    """scheme://host[:port]/path: no credentials, query or fragment."""
    try:
        parsed = parse_url(str(url))
        return str(parsed.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<malformed URL>"


async def system_resolver(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def image_session() -> aiohttp.ClientSession:
    """A session to pass to ``fetch_to_file`` for many fetches: its connections are
    kept and reused (most images come from the one shop's host), where a session of
    its own per fetch opened a TCP (and TLS) connection every time. Safe to share:
    every hop is still vetted before a request, requests go to vetted addresses by
    IP, and aiohttp pools connections by address, port, TLS and server name, so a
    connection is only reused for the host it was made (and verified) for. No
    cookies are kept. Create it inside the running loop; close it when done."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                 connector=aiohttp.TCPConnector(limit=64, limit_per_host=16))


class SharedImageSession:
    """One ``image_session()`` for a component's many fetches, made on first use
    (inside the running loop, as a ClientSession must be) and again if closed."""

    def __init__(self) -> None:
        self.current: aiohttp.ClientSession | None = None

    def get(self) -> aiohttp.ClientSession:
        if self.current is None or self.current.closed:
            self.current = image_session()
        return self.current

    async def close(self) -> None:
        if self.current is not None:
            await self.current.close()


async def fetch_to_file(url: str, dest: Path, *, max_bytes: int, allow: HostAllowList,
                        allowed_kinds: Iterable[str] = IMAGE_KINDS, timeout: float = 30, max_redirects: int = 5,
                        resolver: Resolver | None = None, session: aiohttp.ClientSession | None = None,
                        in_memory_up_to: int = 0, durable: bool = False) -> FetchedFile:
    """Download ``url`` to ``dest`` (written whole via a temp file and a rename, or
    not at all). ``timeout`` bounds the whole fetch: resolution, redirects, body.
    A body of at most ``in_memory_up_to`` bytes is returned in memory instead, and
    nothing is written: no directory, no file, no rename. ``durable`` flushes the
    file to disk (fsync, in a thread) before it is named: for a file that must
    survive a crash of the machine once it is recorded as there.

    Raises BlockedURL (an UnsafeURL) for a URL or address the rule forbids,
    FetchRejected for what no retry will fix, TransientError for what one may."""
    owns_session = session is None
    if session is None:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        async with asyncio.timeout(timeout):
            return await _follow(url, dest, session, max_bytes=max_bytes, allow=allow,
                                 allowed_kinds=tuple(allowed_kinds), max_redirects=max_redirects,
                                 resolve=resolver or system_resolver, connect_timeout=timeout,
                                 in_memory_up_to=in_memory_up_to, durable=durable)
    except TimeoutError:
        raise TransientError(f"timed out after {timeout:g}s fetching {redact(url)}") from None
    except aiohttp.ClientError as exc:
        # Not str(exc): some aiohttp errors quote the full URL.
        raise TransientError(f"{type(exc).__name__} fetching {redact(url)}") from exc
    finally:
        if owns_session:
            await session.close()


async def _follow(url: str, dest: Path, session: aiohttp.ClientSession, *, max_bytes: int, allow: HostAllowList,
                  allowed_kinds: tuple[str, ...], max_redirects: int, resolve: Resolver,
                  connect_timeout: float, in_memory_up_to: int, durable: bool) -> FetchedFile:
    current = url
    for _ in range(max_redirects + 1):
        target, addresses = await vet_url(current, allow, resolve)
        response = await _connect(session, target, addresses, connect_timeout)
        try:
            if response.status in REDIRECT_STATUSES:
                current = _redirect_target(response, target)
                log.info("redirect %s -> %s", redact(target), redact(current))
                continue
            _check_status(response.status, target)
            fetched = await _save_body(response, dest, max_bytes=max_bytes, allowed_kinds=allowed_kinds,
                                       in_memory_up_to=in_memory_up_to, durable=durable)
        finally:
            response.release()
        log.debug("fetched %s: %s, %d bytes", redact(target), fetched.kind, fetched.size)  # per image
        return fetched
    raise FetchRejected(f"too many redirects (more than {max_redirects}) from {redact(url)}")


async def vet_url(url: str, allow: HostAllowList, resolve: Resolver = system_resolver) -> tuple[URL, list[str]]:
    """The parsed URL and the addresses it may be fetched from, or BlockedURL."""
    try:
        # The host checked is the host connected to: a URL that two parsers read
        # differently cannot slip through.
        target = parse_url(url)
        host = check_url(str(target), allow)
    except UnsafeURL as exc:
        raise BlockedURL(str(exc)) from None
    except ValueError as exc:
        raise BlockedURL(f"malformed URL: {exc}") from None
    if host != (target.raw_host or "").lower():
        raise BlockedURL("ambiguous host in URL")
    literal = literal_ip(host)
    if literal is not None:  # check_url has vetted it
        return target, [str(literal)]
    addresses = await _resolve(host, resolve)
    if not allow.allows_host(host):
        for address in addresses:
            try:
                check_address(address, allow)
            except UnsafeURL as exc:
                raise BlockedURL(f"host {host}: {exc}") from None
    return target, [str(address) for address in addresses]


async def _resolve(host: str, resolve: Resolver) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        found = await resolve(host)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise FetchRejected(f"host {host} does not resolve") from None
        raise TransientError(f"resolving {host}: {exc.strerror or exc}") from None
    if not found:
        raise FetchRejected(f"host {host} does not resolve")
    try:
        return [ipaddress.ip_address(text) for text in found]
    except ValueError:
        raise BlockedURL(f"host {host} resolved to a malformed address") from None


async def _connect(session: aiohttp.ClientSession, target: URL, addresses: list[str],
                   connect_timeout: float) -> aiohttp.ClientResponse:
    """GET ``target`` from the first vetted address that accepts a connection."""
    headers = {"Host": target.host_port_subcomponent, "User-Agent": USER_AGENT}
    server_hostname = target.raw_host if target.scheme == "https" else None
    # Per-address connect timeout: a black-holed address must leave time for the next.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout / len(addresses))
    failure: Exception | None = None
    for address in addresses:
        try:
            return await session.get(target.with_host(address).with_fragment(None), headers=headers,
                                     server_hostname=server_hostname, allow_redirects=False, raise_for_status=False,
                                     timeout=timeout)
        except aiohttp.ClientConnectorCertificateError:
            raise FetchRejected(f"TLS certificate of {target.raw_host} rejected") from None
        except (aiohttp.ClientConnectorError, TimeoutError) as exc:
            failure = exc
    raise TransientError(f"cannot connect to {target.raw_host} ({len(addresses)} addresses): "
                         f"{type(failure).__name__}")


def _redirect_target(response: aiohttp.ClientResponse, target: URL) -> str:
    location = response.headers.get("Location")
    if not location:
        raise FetchRejected(f"HTTP {response.status} without Location from {redact(target)}")
    try:
        return str(target.join(parse_url(location)))
    except ValueError:
        raise FetchRejected(f"malformed redirect Location from {redact(target)}") from None


def _check_status(status: int, target: URL) -> None:
    if 200 <= status < 300:
        return
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise TransientError(f"HTTP {status} from {redact(target)}")
    raise FetchRejected(f"HTTP {status} from {redact(target)}")


def _require_image(head: bytes, content_type: str | None, allowed_kinds: tuple[str, ...]) -> str:
    kind = sniff_image_kind(head)
    if kind is None:
        raise FetchRejected(f"not an image (content type {content_type or 'unknown'})")
    if kind not in allowed_kinds:
        raise FetchRejected(f"not an image of an accepted kind ({kind}; accepted: {', '.join(allowed_kinds)})")
    return kind


async def _save_body(response: aiohttp.ClientResponse, dest: Path, *, max_bytes: int,
                     allowed_kinds: tuple[str, ...], in_memory_up_to: int, durable: bool) -> FetchedFile:
    content_type = response.headers.get("Content-Type")
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise FetchRejected(f"too large: {declared} bytes declared, the limit is {max_bytes}")
    # Held in memory while it fits (an undeclared length is found out by reading).
    fits = in_memory_up_to > 0 and (declared is None or declared <= in_memory_up_to)
    held: list[bytes] | None = [] if fits else None
    out, temp = None, None
    try:
        size, head, kind = 0, b"", None
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise FetchRejected(f"too large: more than {max_bytes} bytes")
            if kind is None:
                head += chunk[:SNIFF_BYTES - len(head)]
                if len(head) == SNIFF_BYTES:  # reject a non-image before downloading all of it
                    kind = _require_image(head, content_type, allowed_kinds)
            if held is not None and size <= in_memory_up_to:
                held.append(chunk)
                continue
            if out is None:  # larger than memory may hold: to the file from here on
                out, temp = _open_temp(dest)
                out.writelines(held or ())
                held = None
            # Plain writes: 64 KiB chunks to local disk cost less than a thread hop each.
            out.write(chunk)
        if kind is None:
            kind = _require_image(head, content_type, allowed_kinds)
        if held is not None:
            return FetchedFile(path=None, kind=kind, size=size, content_type=content_type, data=b"".join(held))
        # Opened: a body with no chunk was refused above as no image.
        if durable:  # the wait on the disk's journal is a thread's, not the event loop's
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        out.close()
        os.replace(temp, dest)
    except BaseException:
        if out is not None:
            out.close()
            temp.unlink(missing_ok=True)
        raise
    return FetchedFile(path=dest, kind=kind, size=size, content_type=content_type)


def _open_temp(dest: Path) -> tuple[BinaryIO, Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    return os.fdopen(fd, "wb"), Path(temp_name)
