"""Starting, joining and stopping a served model's Ray actors: one membership controller (which
starts the expert workers and the router replicas), from a driver (`Engine`) or a Serve app.

Every actor is detached and named after the cluster (`{cluster}:controller`, `{cluster}:router-N`,
`{cluster}:worker-N` in the `moe-serving` namespace): they belong to the cluster, not to the process
that started them, so a front end that crashes or restarts finds them again; `stop_cluster`
removes them all.
"""

from __future__ import annotations

import contextlib
import logging

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from router_service.config import EngineConfig
from router_service.runtime.controller_actor import CONTROLLER_MAX_CONCURRENCY, ControllerActor
from router_service.runtime.router_actor import (
    call_actor,
    controller_name,
    ensure_ray,
    kill_cluster_actors,
    min_cluster_cpus,
    router_name,
)
from router_service.runtime.worker_actor import NAMESPACE

log = logging.getLogger(__name__)

# A controller whose process dies comes back (Ray restarts it in place, on another node if its node
# is gone) and recovers its state from the workers and routers: there is no reason to stop trying.
CONTROLLER_MAX_RESTARTS = -1


def controller_actor_class(config: EngineConfig, **options):
    """The controller actor with its options: named, detached, threaded (routers call it while a
    change runs), always restarted; preferably on the caller's node (the head, usually), and with
    the serving actors' custom resources (`serving_actor_resources`: the routers' unless
    serving_resources is set), which keep the control plane off worker nodes that come and go."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(ControllerActor).options(
        scheduling_strategy=here,
        name=controller_name(config.cluster_name),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=CONTROLLER_MAX_CONCURRENCY,
        max_restarts=CONTROLLER_MAX_RESTARTS,
        resources=config.serving_actor_resources,
        **options,
    )


def start_cluster(config: EngineConfig, address: str | None):
    """Start the controller, which starts the workers and the routers, and wait until every router
    has loaded the model (the Engine's way). Returns (controller handle, whether Ray was started
    here)."""
    owns = ensure_ray(address, min_cpus=min_cluster_cpus(config))
    controller = controller_actor_class(config).remote(config)
    try:
        call_actor(controller, "start")
    except BaseException:
        stop_cluster(controller, owns, config.cluster_name)
        raise
    return controller, owns


def attach_cluster(config: EngineConfig):
    """The controller of `config.cluster_name`, started (with its workers and routers) if it is not
    running yet (a Serve app's way); waits until the routers serve."""
    controller = controller_actor_class(config, get_if_exists=True).remote(config)
    call_actor(controller, "start", True)  # reattach: this cluster's workers may already run
    return controller


def router_handle(cluster: str, router_id: str) -> ray.actor.ActorHandle:
    """The handle of router `router_id` of `cluster`, by its actor name (ValueError if gone)."""
    return ray.get_actor(router_name(cluster, router_id), namespace=NAMESPACE)


def router_handles(controller) -> dict[str, ray.actor.ActorHandle]:
    """router id -> handle, of the routers the controller runs now (draining ones left out)."""
    out = {}
    for info in ray.get(controller.routers.remote()):
        if info["draining"]:
            continue
        with contextlib.suppress(ValueError):  # gone since it was listed
            out[info["router_id"]] = ray.get_actor(info["name"], namespace=NAMESPACE)
    return out


def stop_cluster(controller, owns_ray: bool, cluster: str) -> None:
    """Stop the routers, the workers and the controller of `cluster` (and Ray, if this process
    started it)."""
    try:
        ray.get(controller.shutdown.remote(), timeout=60)
    except (RayActorError, RayTaskError, GetTimeoutError) as e:
        log.warning("the cluster did not shut down cleanly: %s", e)
    with contextlib.suppress(Exception):
        ray.kill(controller, no_restart=True)
    kill_cluster_actors(cluster)  # anything a dead controller could not stop
    if owns_ray:
        ray.shutdown()
