"""The local upscaler on its own (smi.upscalers.LocalUpscaler: fetch, Pillow in
worker processes, the result's PNG under a scratch STORAGE_DIR): N upscales of an
image served by a process of its own, as many at once as a stage's batch holds,
and the CPU per upscale of the calling process (the processor stage's share) and
of its workers, from /proc, so the figures hold on a busy machine.

    python -m bench.upscaler [--count N] [--size WxH] [--concurrency C] [--workers W]

The 8×8 default is the pipeline bench's image, fetched into memory; an image over
smi.upscalers.local.IN_MEMORY_SOURCE_BYTES (512 KiB: ``--size 600x600`` of noise is
about 1 MB) takes the path through a source file."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.cpu import children, cpu_seconds

# The image server: a PNG of the asked size (noise, so it does not compress away), its port on stdout.
SERVER = """
import asyncio, io, os, sys
from aiohttp import web
from PIL import Image
width, height = map(int, sys.argv[1].split("x"))
out = io.BytesIO()
Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, format="PNG")
body = out.getvalue()
async def main():
    app = web.Application()
    app.router.add_get("/image.png", lambda _: web.Response(body=body, content_type="image/png"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], len(body), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def run(count: int, size: str, concurrency: int, workers: int) -> None:
    from schemas.urls import HostAllowList
    from smi.upscalers import LocalUpscaler

    server = subprocess.Popen([sys.executable, "-c", SERVER, size], stdout=subprocess.PIPE, text=True)
    storage = Path(tempfile.mkdtemp(prefix="smi-bench-upscaler-"))
    upscaler = LocalUpscaler(storage, allow=HostAllowList.parse("127.0.0.1/32"), workers=workers)
    try:
        assert server.stdout is not None
        port, image_bytes = map(int, server.stdout.readline().split())
        url = f"http://127.0.0.1:{port}/image.png"
        await asyncio.gather(*(upscaler.upscale(f"warm-{i}", url, 2) for i in range(workers * 4)))  # workers started
        limit = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with limit:
                await upscaler.upscale(uuid.uuid4().hex, url, 2)

        pool = children(os.getpid())
        ours, theirs = cpu_seconds(os.getpid()), sum(cpu_seconds(p) or 0.0 for p in pool)
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        wall = time.perf_counter() - started
        ours, theirs = cpu_seconds(os.getpid()) - ours, sum(cpu_seconds(p) or 0.0 for p in pool) - theirs
        print(f"{count} upscales of a {size} PNG ({image_bytes:,} bytes) by 2, {concurrency} at once, "
              f"{workers} workers: {count / wall:.0f}/s; calling process {ours / count * 1e3:.2f} ms CPU each "
              f"({ours / wall:.2f} of a core), workers {theirs / count * 1e3:.2f} ms ({theirs / wall:.2f})")
    finally:
        await upscaler.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(storage, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upscaler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", default="8x8", help="the source image, WIDTHxHEIGHT (default 8x8)")
    parser.add_argument("--concurrency", type=int, default=256, help="upscales at once (a stage's batch: 256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: cores)")
    args = parser.parse_args(argv)
    try:
        width, height = map(int, args.size.split("x"))
    except ValueError:
        parser.error(f"--size must be WIDTHxHEIGHT, not {args.size!r}")
    if min(width, height, args.count, args.concurrency, args.workers) < 1:
        parser.error("--size, --count, --concurrency and --workers must be positive")
    asyncio.run(run(args.count, args.size, args.concurrency, args.workers))


if __name__ == "__main__":
    main()
