"""Start a private Ray instance on this machine, surviving a slow first start.

`ray.init` waits a fixed 30 s for its raylet to register with the GCS and then gives up with "The
current node timed out during startup". On a loaded small machine (2 cores still busy with the
previous instance's exiting processes) that wait is sometimes not enough, although a second try
a moment later succeeds. The half-started processes of the failed try are this process's
children: they are killed before the next try, so nothing of it is left running.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)

START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"


def start_local_ray(attempts: int = START_ATTEMPTS, **init_kwargs: Any) -> None:
    """`ray.init(address="local", **init_kwargs)`, tried again when the node times out starting."""
    import psutil  # vendored by Ray (ray/thirdparty_files), importable once ray is imported

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this case
            if _STARTUP_TIMEOUT not in str(e) or attempt == attempts:
                raise
            log.warning("Ray node start timed out (try %d of %d); trying again", attempt, attempts)
            ray.shutdown()
            _kill_new_children(before)
            time.sleep(2.0 * attempt)


def _kill_new_children(before: set[int]) -> None:
    """Kill the processes the failed try started (gcs_server, raylet, reaper, ...)."""
    import psutil

    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in new:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(new, timeout=10)
