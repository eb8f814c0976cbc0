"""Waiting for Kafka before a stage starts. Faust's worker gives up, exit code 1,
when no broker answers at start; a stage started before its broker (a machine
booting, a compose file without health checks, a broker restart) then depends on
a supervisor to come back. Waiting here makes the start order not matter."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)

FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 15.0


async def broker_answers(bootstrap_servers: str, *, timeout_ms: int = 5000) -> bool:
    """True if a broker of the list answers a metadata request."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=timeout_ms)
    try:
        await client.bootstrap()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        await client.close()


async def wait_for_kafka(bootstrap_servers: str, *,
                         probe: Callable[[str], Awaitable[bool]] = broker_answers,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> int:
    """Return once a broker answers; until then log a warning per try and back off
    (1 s doubling to 15 s). Returns the number of failed tries. Never gives up: a
    stage without its broker has nothing else to do, and Ctrl-C or SIGTERM end it."""
    failures = 0
    delay = FIRST_DELAY_SECONDS
    while not await probe(bootstrap_servers):
        failures += 1
        log.warning("Kafka at %s does not answer; waiting %.0f s before trying again (try %d)",
                    bootstrap_servers, delay, failures)
        await sleep(delay)
        delay = min(delay * 2, MAX_DELAY_SECONDS)
    if failures:
        log.info("Kafka at %s answers after %d failed tries; starting", bootstrap_servers, failures)
    return failures
