"""Elastic expert parallelism on real Ray actors, under concurrent generation load: scaling, rollbacks,
lost workers (killed, stopped), no capacity left, EPLB rebalancing and autoscaling. Every completion
is compared token for token with the same request on an engine that was not disturbed."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
import ray
import torch

from router_service import Engine
from router_service.default_model import default_model_dir
from router_service.errors import MembershipBusy, NoCapacityError, ScaleError
from router_service.runtime.local_ray import start_local_ray

THREADS = 1  # transports agree bit for bit at equal thread counts
TOKENS = 40
PROMPTS = [[40 + i, 41 + 2 * i, 42, 50 + i] for i in range(8)]
WAIT_S = 120  # generous: a loaded CI machine once took a minute to start a Ray node


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    start_local_ray(
        num_cpus=8,
        include_dashboard=False,
        logging_level="WARNING",
        resources={"expert_slot": 4},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()


def sampling(i: int) -> dict:
    """Even requests greedy, odd ones seeded sampling."""
    return {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i} if i % 2 else {}


class Load:
    """PROMPTS streamed concurrently through `engine.generate_stream`, one thread each."""

    def __init__(self, engine: Engine, tokens: int = TOKENS, rounds: int = 1):
        self.tokens: list[list[int] | None] = [None] * len(PROMPTS)
        self.errors: list[str] = []
        self.first_token = threading.Event()

        def run(i: int) -> None:
            try:
                for _ in range(rounds):
                    out = []
                    for chunk in engine.generate_stream(PROMPTS[i], tokens, **sampling(i)):
                        out += chunk["token_ids"]
                        self.first_token.set()
                    self.tokens[i] = out
            except Exception as e:
                self.errors.append(f"request {i}: {type(e).__name__}: {e}")

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(PROMPTS))]
        for t in self.threads:
            t.start()
        assert self.first_token.wait(WAIT_S), "no token came"

    def join(self) -> list[list[int]]:
        for t in self.threads:
            t.join(WAIT_S)
        assert not self.errors, self.errors
        return self.tokens


@pytest.fixture(scope="module")
def reference(model_dir):
    """What an undisturbed engine answers to PROMPTS (streamed together, like the disturbed runs)."""
    with Engine.from_pretrained(model_dir, num_workers=2, num_threads=THREADS) as local:
        return Load(local).join()


def ray_engine(model_dir, **kwargs) -> Engine:
    kwargs.setdefault("num_workers", 2)
    return Engine.from_pretrained(model_dir, transport="ray", num_threads=THREADS, progress="off", **kwargs)


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def named_workers() -> int:
    return sum(":worker-" in a["name"] for a in ray.util.list_named_actors(all_namespaces=True))


def worker_pid(engine: Engine, worker: int) -> int:
    def pid(router, w):
        return ray.get(router.dispatcher.transport._actors[w].__ray_call__.remote(lambda _: os.getpid()))

    return ray.get(engine._router.__ray_call__.remote(pid, worker))


def test_scale_2_4_1_3_under_load_changes_no_token(model_dir, reference):
    with ray_engine(model_dir) as engine:
        versions = [engine.cluster_state()["placement_version"]]
        for n in (4, 1, 3):
            load = Load(engine)
            state = engine.scale(n)  # returns once the new placement serves
            assert state["num_workers"] == n and len(state["workers"]) == n
            assert state["elastic"]["target_workers"] == n
            versions.append(state["placement_version"])
            assert load.join() == reference, f"a completion changed while scaling to {n}"
        assert versions == sorted(versions) and len(set(versions)) == 4
        kinds = [e["kind"] for e in engine.cluster_state()["elastic"]["history"]]
        assert kinds == ["start", "scale", "scale", "scale"]
        ids = [w["worker_id"] for w in engine.cluster_state()["workers"]]
        assert len(set(ids)) == 3 and 0 in ids, "worker ids are names: survivors keep theirs"
        assert named_workers() == 3, "retired workers were stopped"
    assert named_workers() == 0, "shutdown leaves no worker behind"


def test_bad_counts_busy_and_rolled_back_scales(model_dir, tmp_path):
    d = shutil.copytree(model_dir, tmp_path / "model")
    # placement_timeout_s bounds the unplaceable scale below; it must also let a worker process start
    # on a loaded machine (a cold Ray worker takes a few seconds to import torch)
    resources = {"num_cpus": 1, "resources": {"expert_slot": 1}, "placement_timeout_s": 20}
    # restore_interval_s: how long a failed recovery is not retried (requests fail fast meanwhile)
    with ray_engine(d, worker_resources=resources, elastic={"restore_interval_s": 5.0}) as engine:
        ids = torch.randint(3, 200, (2, 9))
        want = engine.forward(ids)
        for bad in (0, 33, "2", True, 2.5):
            with pytest.raises(ValueError, match="num_workers"):
                engine.scale(bad)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(state=engine.scale(3)))
        thread.start()
        wait_for(lambda: engine.health()["changing"] or "state" in result, "the first scale to start")
        if "state" not in result:  # still running: a second change is refused, not queued
            with pytest.raises(MembershipBusy, match="in progress"):
                engine.scale(1)
        thread.join(WAIT_S)
        assert result["state"]["num_workers"] == 3
        engine.scale(2)
        assert torch.equal(engine.forward(ids), want)

        # the cluster has 4 expert slots: a fifth worker cannot be placed -> rolled back, in bounded time
        t0 = time.monotonic()
        with pytest.raises(
            ScaleError, match=r"rolled back \(placement version \d+ still serves\).*cannot place"
        ):
            engine.scale(5)
        assert time.monotonic() - t0 < 60
        assert engine.cluster_state()["num_workers"] == 2 and named_workers() == 2
        assert torch.equal(engine.forward(ids), want)

        # new workers cannot read the checkpoint any more -> rolled back, the old ones still serve
        (d / "model.safetensors").rename(d / "weights.moved")
        with pytest.raises(ScaleError, match="failed to load its experts: CheckpointError"):
            engine.scale(3)
        assert torch.equal(engine.forward(ids), want) and named_workers() == 2

        # ... and when every worker is lost too, no capacity is left: a clear error, fast, and
        # health says so until a worker can start again
        def kill_all(router):
            for actor in list(router.dispatcher.transport._actors.values()):
                ray.kill(actor)

        ray.get(engine._router.__ray_call__.remote(kill_all))
        with pytest.raises(NoCapacityError, match="no expert worker is running and none could be started"):
            engine.forward(ids)
        health = engine.health()
        assert not health["serving"] and "CheckpointError" in health["reason"]
        t0 = time.monotonic()
        with pytest.raises(NoCapacityError):
            engine.forward(ids)
        assert time.monotonic() - t0 < 5, "a request must not wait on a cluster that cannot serve"
        (d / "weights.moved").rename(d / "model.safetensors")
        wait_for(lambda: engine.health()["serving"], "serving again")
        wait_for(lambda: engine.cluster_state()["num_workers"] == 2, "the target count again")
        assert torch.equal(engine.forward(ids), want)


def test_killed_and_stopped_workers_change_no_token(model_dir, reference):
    # 5 s: long enough that a busy machine never misses a ping of a healthy worker
    with ray_engine(model_dir, elastic={"worker_timeout_s": 5.0, "restore_interval_s": 0.5}) as engine:
        # SIGKILL: Ray reports the death at once
        load = Load(engine, tokens=TOKENS, rounds=2)
        os.kill(worker_pid(engine, 1), signal.SIGKILL)
        assert load.join() == reference
        wait_for(lambda: engine.cluster_state()["num_workers"] == 2, "a replacement for the killed worker")
        # SIGSTOP: the process is there but answers nothing; the health check declares it lost
        victim = engine.cluster_state()["workers"][-1]["worker_id"]
        pid = worker_pid(engine, victim)
        load = Load(engine, tokens=TOKENS, rounds=2)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert load.join() == reference
        finally:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGCONT)
        state = wait_for(
            lambda: (
                (s := engine.cluster_state())["num_workers"] == 2
                and victim not in [w["worker_id"] for w in s["workers"]]
                and s
            ),
            "a replacement for the stopped worker",
        )
        events = state["elastic"]["events"]
        assert events["workers_lost"] == 2 and events["failover"] >= 2 and events["restore"] >= 2
        assert len(state["elastic"]["recovery_seconds"]) == 2
        assert state["elastic"]["health"]["serving"]


def test_rebalance_evens_a_skewed_load(reference):
    skewed = default_model_dir("tiny-skewed")
    ids = torch.randint(32, 127, (8, 32), generator=torch.Generator().manual_seed(0))
    elastic = {"rebalance_every_steps": 12, "rebalance_threshold": 0.8}
    with ray_engine(skewed, num_workers=4, redundant_experts=8, elastic=elastic) as engine:
        want = engine.forward(ids)
        greedy = engine.generate(ids[:2, :8], 8)
        before = engine.cluster_state()
        assert max(before["balance"]["balancedness"].values()) < 0.5, "the skewed model is not skewed"
        # the policy checks every 12 decode steps: one generate of 16 steps is enough
        engine.generate(ids[:2, :8], 16)
        after = wait_for(
            lambda: (s := engine.cluster_state())["placement_version"] > before["placement_version"] and s,
            "the automatic rebalance",
        )
        assert [e["kind"] for e in after["elastic"]["history"]] == ["start", "rebalance"]
        assert min(after["balance"]["balancedness"].values()) >= 0.9
        slots = after["placement"]["phy2log"]
        assert all(len(v) == 32 + 8 for v in slots.values()), "every slot, the redundant ones too, is used"
        assert any(len(set(v)) < len(v) for v in slots.values()), "hot experts got replicas"
        # outputs: equal to rounding (not bit for bit: a token's experts are summed in another grouping)
        torch.testing.assert_close(engine.forward(ids), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(engine.generate(ids[:2, :8], 8), greedy)
        result = engine.rebalance()  # by hand: the same EPLB on the same load, nothing left to gain
        assert min(result["after"]["balancedness"].values()) >= 0.9


def test_autoscaling_follows_the_load(model_dir):
    auto = {
        "min_workers": 1,
        "max_workers": 3,
        "target_tokens_per_worker": 3,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 1.0,
        "look_back_period_s": 0.5,
        "metrics_interval_s": 0.25,
    }
    with ray_engine(model_dir, num_workers=1, elastic={"autoscaling": auto}) as engine:
        with pytest.raises(MembershipBusy, match="autoscaling manages the worker count"):
            engine.scale(2)
        load = Load(engine, tokens=120, rounds=3)
        wait_for(lambda: engine.cluster_state()["num_workers"] == 3, "scaling up to 3 under load")
        load.join()
        wait_for(lambda: engine.cluster_state()["num_workers"] == 1, "scaling down to 1 when idle")
        events = engine.cluster_state()["elastic"]["events"]
        assert events["autoscale"] >= 2


def test_router_killed_mid_stream_python_streams_go_on(model_dir, reference):
    with ray_engine(model_dir) as engine:
        ids = torch.randint(3, 200, (2, 9))
        want = engine.forward(ids)
        load = Load(engine, tokens=TOKENS, rounds=2)
        ray.kill(engine._router, no_restart=False)  # Ray restarts it; it reattaches to the workers
        assert load.join() == reference
        torch.testing.assert_close(engine.forward(ids), want, rtol=1e-5, atol=1e-5)
        history = engine.cluster_state()["elastic"]["history"]
        # the restarted router attached to the controller and took its placement: no change at all
        assert [e["kind"] for e in history] == ["start"], history
        assert named_workers() == 2

        # the router and a worker die together: the controller replaces the lost worker's experts
        # (the restarted router gets the new placement when it attaches) and keeps the target count
        engine.scale(3)
        load = Load(engine, tokens=TOKENS, rounds=2)
        os.kill(worker_pid(engine, engine.cluster_state()["workers"][0]["worker_id"]), signal.SIGKILL)
        ray.kill(engine._router, no_restart=False)
        assert load.join() == reference
        state = wait_for(lambda: (s := engine.cluster_state())["num_workers"] == 3 and s, "3 workers again")
        assert state["elastic"]["target_workers"] == 3 and named_workers() == 3
        torch.testing.assert_close(engine.forward(ids), want, rtol=1e-5, atol=1e-5)
