"""A graceful stop of the ingress ends its event pump and every open stream at once, instead of
taking the router it stops for a crash and waiting out a restart."""

import asyncio
import threading

from moe_serving.errors import ServingError
from moe_serving.types import GenerateParams
from router_service.serving.core import IngressCore
from router_service.serving.router_links import OpenGeneration
from router_service.serving.settings import ServingSettings


class SilentStream:
    """The router's generation-event stream, reduced to one that never yields (the pump's only use
    of the router here); the stop must not depend on anything arriving."""

    def __init__(self):
        self.generation_events = self

    def options(self, **_):
        return self

    def remote(self, _subscriber):
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()


def test_stop_from_another_thread_ends_the_pump_and_fails_open_streams():
    async def main():
        core = IngressCore(SilentStream(), spec=None, tokenizer=None, settings=ServingSettings())
        req = OpenGeneration(prompt=[1, 2], params=GenerateParams(), news=asyncio.Queue())
        req.link = core.links["0"]
        core._open["r1"] = req
        core._ensure_pumps()
        await asyncio.sleep(0.05)  # the pump is reading the stream
        stopper = threading.Thread(target=core.stop)  # Serve calls __del__ off the event loop
        stopper.start()
        stopper.join()
        tokens, finish, err, _ = await asyncio.wait_for(req.news.get(), timeout=5)
        assert (tokens, finish) == ([], None)
        assert isinstance(err, ServingError) and "stopping" in str(err)
        await asyncio.sleep(0.05)
        assert core.links["0"].pump_task.cancelled() and core.stopping

    asyncio.run(main())
