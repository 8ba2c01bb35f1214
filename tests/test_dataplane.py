"""Where the shared request path runs work proportional to a request: small work on the event
loop (a trip to the parsing thread costs more), the rest off it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest

from app.api.dataplane import IN_PLACE_BYTES, IN_PLACE_COPY_BYTES, copied, parsed


@pytest.mark.parametrize(("placed", "limit"), [(parsed, IN_PLACE_BYTES), (copied, IN_PLACE_COPY_BYTES)],
                         ids=["parsing", "copying"])
def test_work_up_to_its_limit_runs_on_the_loop_and_past_it_on_the_parsing_thread(
        placed: Callable[..., Awaitable[threading.Thread]], limit: int) -> None:
    async def threads() -> list[threading.Thread]:
        return [await placed(threading.current_thread, size) for size in (limit, limit + 1)]

    on_loop, off_loop = asyncio.run(threads())
    assert on_loop is threading.current_thread()
    assert off_loop.name.startswith("body-parsing")
