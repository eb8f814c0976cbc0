"""Key layout of the job table. Every key carries a shard hash tag ``{s<N>}``; a
job's keys and its shard's indexes share the tag, so each script touches one
Redis Cluster slot (design.md, "Durability ... Scale"). <id> is the job id as
stored: a UUID's 16 bytes in URL-safe base64, 22 characters (codec.compact_id),
so the key and each index entry (eight for a completed job) cost 14 bytes less.

    job:{s3}:<id>                hash: the job record under short field codes, with
                                 its history and the side effects done (codec.py)
    req:{s3}                     hash: lookup_field(request_id) -> <id>
    st:{s3}:<status>:c | :u      sorted sets (lexicographic): "<ms>:<id>" by
                                 created/updated
    by:{s3}:<cs|pi|up|cb|tok>    hash: lookup_field(value) -> <id>
    dl:{s3}:<deadline>           sorted set: <id> scored by due time (ms), one per
                                 schemas.status.Deadline (abandon, retry, poll, ...)
    rev:{s3}                     hash: the shard's running revenue figures, kept by
                                 the scripts that write the fields they count
                                 (lua/prelude.lua, "Running revenue figures")

The lookups (req, by) are keyed by ``codec.lookup_field`` of the value, not the value:
Stripe's session ids take 66 characters, a token hash 43, and an entry of a large
Redis hash costs its key's allocation class (80 or 48 bytes for those) where 28
characters fit the 32-byte class. That cut 96 bytes a completed job. A reader
checks that the job found holds the value itself, so a collision (112 bits: none
expected before about 2^56 entries) could not hand out the wrong job.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass

from schemas.status import Deadline, JobStatus
from smi.jobtable.codec import compact_id, expand_id

@dataclass(frozen=True)
class Lookup:
    """One lookup index: its key's suffix (by:{s3}:<code>), the job's field that
    holds the value, and a field holding more of them, space-separated (a download
    token's older hashes still live)."""

    code: str
    field: str
    also_in_list: str | None = None


LOOKUPS = {
    "checkout_session": Lookup("cs", "stripe_checkout_session_id"),
    "payment_intent": Lookup("pi", "stripe_payment_intent_id"),
    "upsampler_job": Lookup("up", "upsampler_job_id"),
    "callback_token": Lookup("cb", "callback_token_hash"),
    "download_token": Lookup("tok", "download_token_hash", also_in_list="download_token_hashes"),
}


def shard_of(value: str, shards: int) -> int:
    return zlib.crc32(value.encode("utf-8")) % shards


class KeySpace:
    """``namespace`` (optional) goes in front of the tag: ``job:<ns>{s3}:<id>``. It
    lets several tables (tests, tenants) share one Redis without touching each other."""

    def __init__(self, shards: int, namespace: str = ""):
        if not 1 <= shards <= 1024:
            raise ValueError("shard count must be 1..1024")
        if "{" in namespace or "}" in namespace:
            raise ValueError("namespace must not contain braces (they delimit the hash tag)")
        self.shards = shards
        self.namespace = namespace

    def tag(self, shard: int) -> str:
        return f"{self.namespace}{{s{shard}}}"

    def tag_of(self, job_id: str) -> str:
        return self.tag(shard_of(job_id, self.shards))

    def job(self, job_id: str) -> str:
        return self.job_key(self.tag_of(job_id), compact_id(job_id))

    @staticmethod
    def job_key(tag: str, stored_id: str) -> str:
        """The job hash's key from its shard tag and stored id (both already at hand)."""
        return f"job:{tag}:{stored_id}"

    @staticmethod
    def stored_id(job_id: str) -> str:
        """The job id as the indexes and deadline sets hold it."""
        return compact_id(job_id)

    @staticmethod
    def job_id_of(stored: str | bytes) -> str:
        return expand_id(stored.decode("ascii") if isinstance(stored, bytes) else stored)

    def status_index(self, shard: int, status: JobStatus, order: str) -> str:
        return f"st:{self.tag(shard)}:{status.value}:{order}"

    def lookup(self, shard: int, kind: str) -> str:
        return f"by:{self.tag(shard)}:{LOOKUPS[kind].code}"

    def deadline(self, shard: int, kind: Deadline) -> str:
        return f"dl:{self.tag(shard)}:{kind.value}"

    def revenue(self, shard: int) -> str:
        return f"rev:{self.tag(shard)}"

    def new_job_id(self, request_id: str | None = None) -> str:
        """A fresh UUIDv4. With a request id, one that lands in the request id's shard,
        so "is this request known? else create the job" is ONE atomic script in one
        slot. One uuid4, then its last three hex digits are tried in turn until the
        crc32 (extended from the rest's, so a try costs a 3-byte crc) matches: about
        `shards` tries, where a uuid4 per try cost more than the rest of the
        request. 110 random bits remain."""
        job_id = str(uuid.uuid4())
        if request_id is None:
            return job_id
        want = shard_of(request_id, self.shards)
        stem = job_id[:-3]
        stem_crc = zlib.crc32(stem.encode("ascii"))
        start = int(job_id[-3:], 16)
        for step in range(4096):
            suffix = b"%03x" % ((start + step) % 4096)
            if zlib.crc32(suffix, stem_crc) % self.shards == want:
                return stem + suffix.decode("ascii")
        return self.new_job_id(request_id)  # no suffix of this stem fits: another stem
