"""The local upscaler (UPSCALER=local): fetch the image under the same URL rules as
everything else, resize it with Pillow's Lanczos filter in worker processes (the
event loop never waits on pixels), and store a PNG under STORAGE_DIR.

All Pillow work, including checking an existing result, runs in the workers: the
decompression-bomb limit is process-wide state, set there per call and never in
the stage's own process."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import pickle
import re
import tempfile
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from schemas.urls import HostAllowList
from smi.errors import PermanentError, TransientError
from smi.fetch import SharedImageSession, fetch_to_file
from smi.jobfiles import attempt_dir, job_dir

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Written into every result, so a later call can tell a finished file of the right
# size from anything else lying at that path without fetching the source again.
SOURCE_SIZE_KEY = "smi-source-size"
SAFE_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
RESIZABLE_MODES = ("RGB", "RGBA", "L", "LA")


# Calls sent to the worker processes in one submission, at most (see _in_worker).
MAX_CALLS_PER_SUBMISSION = 16
# Images up to this size are fetched into memory, not to a file: most shop images
# (a WordPress "large" JPEG is 100-300 KB). The two batches of 256 jobs a stage has in
# hand when behind (STAGE_BATCHES_IN_FLIGHT) hold at most 256 MiB of them.
IN_MEMORY_SOURCE_BYTES = 512 * 1024


@dataclass(frozen=True)
class _WaitingCall:
    function: Callable[..., Any]
    args: tuple
    result: asyncio.Future


class LocalUpscaler:
    def __init__(self, storage_dir: Path, *, allow: HostAllowList, max_input_bytes: int = 50 * MiB,
                 max_output_pixels: int = 200_000_000, workers: int = 1):
        self.storage_dir = Path(storage_dir)
        self.allow = allow
        self.max_input_bytes = max_input_bytes
        self.max_output_pixels = max_output_pixels
        self.workers = workers
        self._pool = self._new_pool()
        self._waiting: list[_WaitingCall] = []  # worker calls of this pass of the event loop
        self._session = SharedImageSession()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that runs Kafka and Redis client
        # threads can copy a lock in its held state into the child.
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))

    def result_path(self, job_id: str, factor: int, attempt: int | None = None) -> Path:
        # Under the attempt's own directory (smi/jobfiles.py), so the janitor purging
        # an earlier, failed attempt never deletes this one's files; without an
        # attempt (callers outside the pipeline), in the job's directory.
        directory = job_dir(self.storage_dir, job_id) if attempt is None else attempt_dir(self.storage_dir, job_id,
                                                                                           attempt)
        return directory / f"upscaled-{factor}x.png"

    async def upscale(self, job_id: str, image_url: str, factor: int, *, attempt: int | None = None) -> Path:
        """The path of the upscaled PNG; an existing valid result (of the same
        attempt) is returned as is."""
        if not SAFE_JOB_ID.fullmatch(job_id):
            raise PermanentError("job id is not usable as a directory name")
        if factor < 1:
            raise PermanentError(f"upscale factor {factor} must be at least 1")
        final = self.result_path(job_id, factor, attempt)
        # The stat spares the common case (no result yet) a round trip to a worker.
        if final.exists() and await self._in_worker(is_complete_result, str(final), factor, self.max_output_pixels):
            log.info("job %s: %s already done", job_id, final.name)
            return final
        # A small image goes to the worker as bytes, and the worker makes the
        # result's directory: no directory, file, rename or unlink on the event loop,
        # where they were a quarter of the loop's time per job (each waits on the
        # file system's journal). A larger one is written to a source file of this
        # call's own: a redelivered job running twice at once never shares (or
        # deletes) the other run's file; the result's rename is atomic.
        source_path = final.parent / f".source-{uuid.uuid4().hex}"
        source = None
        try:
            source = await fetch_to_file(image_url, source_path, max_bytes=self.max_input_bytes, allow=self.allow,
                                         session=self._session.get(), in_memory_up_to=IN_MEMORY_SOURCE_BYTES)
            before, after = await self._in_worker(upscale_file, source.data if source.path is None
                                                  else str(source.path), str(final), factor, self.max_output_pixels)
        finally:
            if source is not None and source.path is not None:  # written to a file (a failed fetch leaves none)
                source_path.unlink(missing_ok=True)
        log.debug("job %s: upscaled %dx%d to %dx%d (%s)", job_id, *before, *after, final.name)  # per job
        return final

    async def _in_worker(self, function, *args):
        """``function(*args)`` in a worker process. Calls made during one pass of
        the event loop travel together (``_send_waiting``): the pool costs the
        stage's process about half a millisecond of CPU per submission (pickling,
        its feeder and manager threads, their wake-ups), more than upscaling a
        small image, and a stage taking a batch of jobs makes many calls at once."""
        loop = asyncio.get_running_loop()
        call = _WaitingCall(function, args, loop.create_future())
        self._waiting.append(call)
        if len(self._waiting) == 1:
            loop.call_soon(self._send_waiting)
        return await call.result

    def _send_waiting(self) -> None:
        calls, self._waiting = self._waiting, []
        # Enough submissions to keep every worker busy, none over MAX_CALLS_PER_SUBMISSION:
        # a call waits behind the others of its submission, a large image behind small ones.
        per_submission = min(MAX_CALLS_PER_SUBMISSION, -(-len(calls) // self.workers))
        for start in range(0, len(calls), per_submission):
            self._submit(calls[start:start + per_submission])

    def _submit(self, calls: list[_WaitingCall]) -> None:
        pool = self._pool
        try:
            submitted = pool.submit(run_calls, [(call.function, call.args) for call in calls])
        except Exception as exc:  # a broken pool, or one shut down by close()
            self._settle(calls, pool, exc)
            return
        asyncio.wrap_future(submitted).add_done_callback(lambda done: self._settle_done(calls, pool, done))

    def _settle_done(self, calls: list[_WaitingCall], pool: ProcessPoolExecutor, done: asyncio.Future) -> None:
        if done.cancelled():  # close() cancelled it before a worker took it
            self._settle(calls, pool, TransientError("the upscaler is closing"))
        elif done.exception() is not None:
            self._settle(calls, pool, done.exception())
        else:
            self._settle(calls, pool, None, done.result())

    def _settle(self, calls: list[_WaitingCall], pool: ProcessPoolExecutor, error: BaseException | None,
                outcomes: list[tuple[bool, object]] | None = None) -> None:
        if isinstance(error, BrokenProcessPool):
            # A worker died (most likely killed for memory) and took the pool with it;
            # the first submission to notice replaces it.
            if self._pool is pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            error = TransientError("an upscaler worker process died")
        for index, call in enumerate(calls):
            if call.result.done():  # its caller was cancelled
                continue
            if error is not None:
                call.result.set_exception(error)
            else:
                succeeded, value = outcomes[index]
                call.result.set_result(value) if succeeded else call.result.set_exception(value)

    async def close(self) -> None:
        await self._session.close()
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)


# Worker functions: top level, so the process pool can pickle them by name.

def run_calls(calls: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[bool, object]]:
    """Each call's outcome, in order: (True, its result) or (False, the exception
    it raised). One call's failure is its own, never its neighbours'."""
    outcomes: list[tuple[bool, object]] = []
    for function, args in calls:
        try:
            outcomes.append((True, function(*args)))
        except Exception as exc:
            outcomes.append((False, exc if _picklable(exc) else PermanentError(f"{type(exc).__name__}: {exc}")))
    return outcomes


def _picklable(exc: Exception) -> bool:
    # An exception that cannot travel back would fail the whole submission.
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False


def upscale_file(source: str | bytes, dest: str, factor: int,
                 max_output_pixels: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize ``source`` (a file, or the image's bytes) by ``factor`` into the PNG
    ``dest`` (temp file + rename; its directory made if need be); returns the
    source and result sizes. Refuses, before decoding any pixel, an image whose
    result would exceed ``max_output_pixels``."""
    with _pixel_limit(max_output_pixels), _open_image(source) as image:
        width, height = image.size  # from the header: no pixel decoded yet
        if width * factor * height * factor > max_output_pixels:
            raise PermanentError(f"result would be {width * factor}x{height * factor} pixels, "
                                 f"over the limit of {max_output_pixels}")
        try:
            # Browsers show the EXIF orientation; the customer buys what they saw.
            upright = ImageOps.exif_transpose(image)
            if upright.mode not in RESIZABLE_MODES:
                upright = upright.convert("RGBA" if upright.has_transparency_data else "RGB")
            result = upright.resize((upright.width * factor, upright.height * factor), Image.LANCZOS)
        except (OSError, ValueError) as exc:
            raise PermanentError(f"cannot decode the image: {exc}") from None
    info = PngImagePlugin.PngInfo()
    info.add_text(SOURCE_SIZE_KEY, f"{upright.width}x{upright.height}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".upscaled-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            result.save(out, format="PNG", pnginfo=info)
            out.flush()
            os.fsync(out.fileno())  # the result is what the customer pays for: on disk before it is named
        os.replace(temp, dest)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return upright.size, result.size


def is_complete_result(path: str, factor: int, max_output_pixels: int) -> bool:
    """A PNG written by upscale_file at this factor, intact."""
    if not os.path.exists(path):
        return False
    try:
        with _pixel_limit(max_output_pixels), Image.open(path) as image:
            source = image.info.get(SOURCE_SIZE_KEY, "")
            width, _, height = source.partition("x")
            if image.format != "PNG" or not (width.isdigit() and height.isdigit()):
                return False
            if image.size != (int(width) * factor, int(height) * factor):
                return False
            image.verify()  # chunk checksums: a damaged file is redone
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return False


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at ``max_pixels``, its warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        yield


def _open_image(source: str | bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise PermanentError("not a decodable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PermanentError(f"cannot read the image: {exc}") from None
