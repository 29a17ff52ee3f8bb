"""The process beacon: a peer learns of a SIGKILLed process from its socket, not from Ray."""

import asyncio
import os
import signal
import subprocess
import sys

from router_service.runtime.liveness import ProcessBeacon, wait_closed

BEACON_CHILD = """
import sys, time
from router_service.runtime.liveness import ProcessBeacon
b = ProcessBeacon("127.0.0.1")
print(b.address[1], flush=True)
time.sleep(600)
"""


def test_a_sigkilled_process_closes_its_beacon_at_once():
    child = subprocess.Popen([sys.executable, "-c", BEACON_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())

        async def watch() -> bool:
            task = asyncio.ensure_future(wait_closed(("127.0.0.1", port)))
            await asyncio.sleep(0.2)
            assert not task.done(), "the beacon closed while its process lived"
            os.kill(child.pid, signal.SIGKILL)
            return await asyncio.wait_for(task, timeout=30)

        assert asyncio.run(watch()) is True
    finally:
        child.kill()
        child.wait()


def test_a_beacon_that_cannot_be_reached_says_nothing():
    b = ProcessBeacon("127.0.0.1")
    address = b.address
    b.close()
    assert asyncio.run(asyncio.wait_for(wait_closed(address, connect_timeout_s=5), timeout=30)) is False


def test_a_watch_can_be_cancelled_and_the_beacon_lives_on():
    b = ProcessBeacon("127.0.0.1")

    async def watch_then_cancel() -> None:
        task = asyncio.ensure_future(wait_closed(b.address))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        again = asyncio.ensure_future(wait_closed(b.address))  # a second peer still connects
        await asyncio.sleep(0.1)
        assert not again.done()
        b.close()  # now the process "goes": the peer reads EOF
        assert await asyncio.wait_for(again, timeout=10) is True

    asyncio.run(watch_then_cancel())
