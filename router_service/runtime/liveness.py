"""A process's death, told to its peers at once.

Ray tells a caller that an actor's process died only after its raylet noticed, the GCS marked the
actor restarting and the owner failed the calls in flight: 1.2 s on the loaded 2-core machine for a
streaming call (and a stream may not end at all: ray-project/ray#43914). A TCP connection says it
in milliseconds: when a process dies, SIGKILL included, the kernel closes its sockets, and the peer
reads EOF. So a router listens on a `ProcessBeacon` (a port that nobody writes to) and a front end
keeps a connection to it open (`wait_closed`): EOF means the process it came from is gone, and its
streams move to another router without waiting for Ray.

The beacon only speeds up the detection: a peer that cannot connect (another network, a firewall)
or a node that vanishes without closing anything (no FIN ever comes) falls back to Ray's report and
the event stream's silence.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from router_service.runtime.data_plane import accept_forever, close_listener

log = logging.getLogger(__name__)


class ProcessBeacon:
    """A listening TCP port on `host` whose connections stay open, unread, until this process ends."""

    def __init__(self, host: str):
        self._sock = socket.create_server((host, 0))
        self.address = (host, self._sock.getsockname()[1])
        self._conns: list[socket.socket] = []  # kept open: closing them would say "dead"
        threading.Thread(target=self._accept, name="process-beacon", daemon=True).start()

    def _accept(self) -> None:
        accept_forever(self._sock, self._keep)

    def _keep(self, conn: socket.socket) -> None:
        self._conns = [c for c in self._conns if c.fileno() >= 0] + [conn]

    def close(self) -> None:
        """Close the port and every connection (the peers read EOF: this process is going)."""
        close_listener(self._sock)
        for c in self._conns:
            c.close()


async def wait_closed(address: tuple[str, int], connect_timeout_s: float = 5.0) -> bool:
    """Connect to a `ProcessBeacon` at `address` and wait until its process closes the connection.
    True when it did (the process is gone); False when no connection could be made (nothing is
    known). Cancel it to stop watching."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), connect_timeout_s)
    except (OSError, asyncio.TimeoutError) as e:
        log.info("cannot watch the process at %s:%s (%s); relying on Ray", *address, e)
        return False
    try:
        while await reader.read(4096):
            pass  # a beacon never writes; anything it sends means nothing
        return True
    except OSError:  # reset: gone as well
        return True
    finally:
        writer.close()
