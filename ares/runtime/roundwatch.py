"""Waiting devices cost O(1): the long poll behind `GET /v1/round?round=R&wait=S`.

A device between rounds asks once and is answered when its round takes joins (or the job ends,
or `S` seconds pass), instead of asking ten times a second. A thousand such requests wait here
on one `asyncio.Event`; one task reads the round state (`TrainingServer.round_state`, no lock)
every `period_s` and wakes them when it changes. What the server does per waiting device is one
check per change of state, whatever the fleet's size: no thread, no poll of its own.

A round opens by the clock (the gap after a round ends at `opens_at`), not only by an event that
could be signalled, so the state is read on a period; `period_s` is the latency it adds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Optional

from ares.core.messages import RoundState


class RoundWatch:
    """The round state as of the last read, and an event set each time it changes."""

    def __init__(self, read: Callable[[], RoundState], period_s: float = 0.02) -> None:
        self.read = read
        self.period_s = period_s
        self.state = read()
        self._changed = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def start(self) -> "RoundWatch":
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._follow())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            state = self.read()
            if state != self.state:
                self.state = state
                self._changed.set()  # wakes every waiter; the next change needs a new event
                self._changed = asyncio.Event()

    async def wait_open(self, round_index: int, wait_s: float) -> RoundState:
        """The state as soon as it `opens_for(round_index)`, or as it is after `wait_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not self.state.opens_for(round_index):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return self.state

