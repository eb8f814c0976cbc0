"""Loads the Lua scripts (each prefixed with the shared prelude) and registers them
on a client; redis-py runs them by EVALSHA and reloads them after a Redis restart.
The prelude starts with the job statuses, from schemas.status, as the Lua list
STATUSES (scripts that visit each status index of a shard read it), then the
stored codes of the fields and statuses (smi.jobtable.codec.lua_constants), then
the lookups of smi.jobtable.keys as the Lua tables LOOKUPS and TOKEN_LOOKUP."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from schemas.status import JobStatus
from smi.jobtable.codec import lua_constants
from smi.jobtable.keys import LOOKUPS

LUA_DIR = Path(__file__).parent / "lua"
NAMES = ("create", "transition", "update", "issue_token", "claim_due", "clear_deadline_if", "end_warning",
         "mark_done", "rebuild_revenue")


@cache
def source(name: str) -> str:
    statuses = ", ".join(f"'{status.value}'" for status in JobStatus)
    prelude = (f"local STATUSES = {{{statuses}}}\n" + lua_constants() + lua_lookups()
               + (LUA_DIR / "prelude.lua").read_text())
    return prelude + "\n" + (LUA_DIR / f"{name}.lua").read_text()


def lua_lookups() -> str:
    """LOOKUPS: a single-valued lookup's field code -> its index code, kept by the
    prelude's apply_fields whenever the field is written. TOKEN_LOOKUP: the download
    token's index code; a job has several live token hashes, so issue_token.lua
    keeps that index itself."""
    single = ", ".join(f"[F.{lookup.field}] = '{lookup.code}'"
                       for lookup in LOOKUPS.values() if lookup.also_in_list is None)
    return f"local LOOKUPS = {{{single}}}\nlocal TOKEN_LOOKUP = '{LOOKUPS['download_token'].code}'\n"


def register_all(client) -> dict:
    return {name: client.register_script(source(name)) for name in NAMES}
