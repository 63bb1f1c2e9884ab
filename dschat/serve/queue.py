"""One engine, one request at a time: a bounded FIFO queue in front of a single worker thread.

A request becomes a Job: a function run in the worker thread with the engine, which emits events (pieces
of text, the outcome) onto an asyncio queue of the event loop that asked, through call_soon_threadsafe, so
the loop never blocks on the engine. A job is cancelled when its client goes away: a waiting one leaves the
queue at once, a running one stops at its next token (the work function checks `cancelled()`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Callable


class QueueFull(Exception):
    def __init__(self, waiting: int):
        super().__init__(f"the server is busy ({waiting} requests waiting); try again shortly")
        self.waiting = waiting


class Cancelled(Exception):
    """The job was cancelled before it ran."""


class Job:
    def __init__(self, work: Callable, loop: asyncio.AbstractEventLoop):
        self.work = work  # work(engine, emit, cancelled) -> result
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.finished = False

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, kind: str, value: Any = None):
        """From the worker thread: put (kind, value) on the loop's queue ("piece", "done" or "error")."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


class Scheduler:
    def __init__(self, engine, max_waiting: int):
        self.engine, self.max_waiting = engine, max_waiting
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self.completed = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._loop, name="dschat-engine", daemon=True)
        self._thread.start()

    def submit(self, work: Callable) -> Job:
        """Queue work (from the event loop); QueueFull when max_waiting requests already wait."""
        job = Job(work, asyncio.get_running_loop())
        with self._cv:
            if self._closed or len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting))
            self._waiting.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job):
        """Stop a job: out of the queue if it waits, at its next token if it runs; nothing if it is done."""
        with self._cv:
            if job.finished:
                return
            job._cancel.set()
            if job in self._waiting:
                self._waiting.remove(job)
                self.cancelled += 1
                job.emit("error", Cancelled("cancelled while waiting"))

    def status(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "running": int(self._running is not None),
                    "max_waiting": self.max_waiting, "completed": self.completed, "cancelled": self.cancelled}

    def close(self, timeout: float = 5.0):
        with self._cv:
            self._closed = True
            for job in self._waiting:
                job._cancel.set()
                job.emit("error", Cancelled("the server is shutting down"))
            self._waiting.clear()
            if self._running is not None:
                self._running._cancel.set()
            self._cv.notify_all()
        self._thread.join(timeout)

    def _loop(self):
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running = job
            try:
                event = ("done", job.work(self.engine, job.emit, job.cancelled))
            except Exception as e:  # reported to the request, which answers with its shape's error
                event = ("error", e)
            with self._cv:  # the status is current before the client hears the outcome
                job.finished = True
                self._running = None
                if job.cancelled():
                    self.cancelled += 1
                else:
                    self.completed += 1
            job.emit(*event)
