"""Several probes' measurements at once, their requests in shared batches.

A probe's `measure` asks for results through `Context.execute` and may ask several times
(a conversation turn by turn). Run one probe after another and every probe's requests are a
batch of their own: a decode of a few dozen rows, a scoring pass half full. `gather` runs
each measurement in a thread of its own whose `execute` only hands its requests over and
waits; when every measurement still running is waiting, the requests of all of them go to
the backend in one call (the calling thread's), and each gets its own results back. The
model is only ever used from the calling thread.

Batches do not depend on timing: a round starts only when every running job has asked, so
the same jobs make the same batches on every run. A batch that fails is retried job by job,
so one probe's bad request fails that probe alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sway_engine.requests import Request, Result

T = TypeVar("T")
Execute = Callable[[Sequence[Request]], list[Result]]


class _Stopped(Exception):
    """The gathering ended (the serving thread was interrupted) while a job still asked."""


def gather(
    jobs: Sequence[Callable[[Execute], T]],
    execute: Execute,
    on_done: Callable[[int], None] | None = None,
) -> list[T | Exception]:
    """Each job's return value, or the exception it raised, in job order; every job's
    requests reach `execute` together with those of the other jobs running. `on_done(i)`
    hears, in the calling thread, of each job that ended, between rounds (progress)."""
    if len(jobs) == 1:  # no one to share with: this thread
        alone = _outcome(jobs[0], execute)
        if on_done is not None:
            on_done(0)
        return [alone]
    broker = _Broker(execute, len(jobs), on_done)
    outcomes: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            outcomes[i] = _outcome(jobs[i], broker.execute_for(i))
        finally:
            broker.finished(i)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"sway-gather-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    try:
        broker.serve()
    finally:
        broker.stop()
        for thread in threads:
            thread.join()
    return outcomes


def _outcome(job: Callable[[Execute], T], execute: Execute) -> T | Exception:
    try:
        return job(execute)
    except Exception as exc:  # noqa: BLE001 - the caller decides per job
        return exc


class _Broker:
    def __init__(
        self, execute: Execute, running: int, on_done: Callable[[int], None] | None = None
    ) -> None:
        self._execute = execute
        self._on_done = on_done
        self._ended: list[int] = []  # jobs that ended since the last report
        self._cond = threading.Condition()
        self._running = running
        self._asked: dict[int, list[Request]] = {}
        self._answers: dict[int, list[Result] | Exception] = {}
        self._stopped = False

    def execute_for(self, job: int) -> Execute:
        def execute(requests: Sequence[Request]) -> list[Result]:
            with self._cond:
                if self._stopped:
                    raise _Stopped("the batch this request would join was interrupted")
                self._asked[job] = list(requests)
                self._cond.notify_all()
                while job not in self._answers:
                    self._cond.wait()
                got = self._answers.pop(job)
            if isinstance(got, Exception):
                raise got
            return got

        return execute

    def finished(self, job: int) -> None:
        with self._cond:
            self._running -= 1
            self._ended.append(job)
            self._cond.notify_all()

    def _report(self, ended: list[int]) -> None:
        if self._on_done is not None:
            for job in sorted(ended):
                self._on_done(job)

    def stop(self) -> None:
        """Answer whatever still waits with an error (after an interruption), so every
        thread ends."""
        with self._cond:
            self._stopped = True
            for job in self._asked:
                self._answers[job] = _Stopped("the batch was interrupted")
            self._asked = {}
            self._cond.notify_all()

    def serve(self) -> None:
        """Rounds until every job has finished: wait until each running job has asked, then
        answer all of them from one backend call."""
        while True:
            with self._cond:
                while self._running and len(self._asked) < self._running:
                    self._cond.wait()
                ended, self._ended = self._ended, []
                if not self._running:
                    self._report(ended)
                    return
                asked, self._asked = dict(sorted(self._asked.items())), {}  # job order
            self._report(ended)
            answers = self._answer(asked)
            with self._cond:
                self._answers.update(answers)
                self._cond.notify_all()

    def _answer(self, asked: dict[int, list[Request]]) -> dict[int, list[Result] | Exception]:
        flat = [req for reqs in asked.values() for req in reqs]
        if not flat:
            return {job: [] for job in asked}
        try:
            results = self._execute(flat)
        except Exception:  # noqa: BLE001 - find the job whose requests fail, job by job
            return {job: self._alone(reqs) for job, reqs in asked.items()}
        out: dict[int, list[Result] | Exception] = {}
        start = 0
        for job, reqs in asked.items():
            out[job] = results[start : start + len(reqs)]
            start += len(reqs)
        return out

    def _alone(self, requests: list[Request]) -> list[Result] | Exception:
        try:
            return self._execute(requests)
        except Exception as exc:  # noqa: BLE001 - this job's own failure
            return exc
