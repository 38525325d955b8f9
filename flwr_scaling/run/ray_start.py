"""Starting a local Ray on a background thread, so that it comes up while this process prepares the work.

``ray.init`` takes 2-4 s on a small machine (the GCS, the raylet, the first
workers), and a command spends about as long before it needs Ray: a sweep
imports the data libraries and checks every run, a simulation reads its data
and draws the partition heatmap. ``RayStart`` runs ``ray.init`` on a thread as
soon as the cheap checks have passed; ``wait()`` joins it where Ray is needed
and ``stop()`` shuts it down. A command that fails after the start (a corrupt
data file, say) stops Ray before its one-line error, so nothing is left
running.

The thread lives until ``stop()``: Ray starts its GCS and raylet with a
parent-death signal (``PR_SET_PDEATHSIG``), which Linux sends when the *thread*
that started them ends, not the process. A thread that returned right after
``ray.init`` took Ray down with it ("Failed to connect to GCS within 60
seconds" at the first task).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any


class RayStart:
    """``ray.init(**settings)`` begun on a daemon thread at construction.

    Parameters
    ----------
    settings : mapping
        Keyword arguments of ``ray.init``.
    then : callable, optional
        Called on the thread once Ray is up (a sweep submits tasks that warm its workers up); what
        it returns is kept in ``self.started`` and an error in it is ignored: it may only speed
        things up.
    """

    def __init__(self, settings: Mapping[str, Any], then: Callable[[], Any] | None = None) -> None:
        import ray  # imported here, not on the thread: two threads importing the same package can deadlock

        del ray
        self._settings = dict(settings)
        self._then = then
        self.started: Any = None
        self._ready = threading.Event()
        self._release = threading.Event()
        self._problem: BaseException | None = None
        self._began = time.perf_counter()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._start, name="flwr-scaling-ray-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        import ray

        try:
            ray.init(**self._settings)
        except BaseException as problem:  # handed to wait(), on the caller's thread
            self._problem = problem
        finally:
            self.seconds = time.perf_counter() - self._began
            self._ready.set()
        if self._problem is None and self._then is not None:
            try:
                self.started = self._then()
            except Exception:  # noqa: BLE001 - an optional speed-up; the real work reports real faults
                pass
        self._release.wait()  # see the module docstring: Ray's processes die with this thread
        if self._problem is None and ray.is_initialized():
            ray.shutdown()  # here, so that stop(wait=False) returns at once (it takes 1-2 s)

    def wait(self) -> float:
        """Block until Ray is up; return how long ``ray.init`` took, or raise its error."""
        self._ready.wait()
        if self._problem is not None:
            self._release.set()
            raise self._problem
        return self.seconds

    def stop(self, wait: bool = True) -> None:
        """Shut down the Ray this started (unless something else did, as Flower's backend does) and end
        the thread, once ``ray.init`` has returned; ``wait=False`` returns while the thread shuts Ray
        down (a sweep writes its report meanwhile), and a later ``stop()`` waits for it."""
        self._ready.wait()
        self._release.set()
        if wait:
            self._thread.join()


__all__ = ["RayStart"]
