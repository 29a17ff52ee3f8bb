"""start_local_ray: a node start that times out is retried, and the failed try leaves nothing."""

import subprocess

import pytest
import ray

from router_service.runtime.local_ray import start_local_ray

TIMEOUT = "The current node timed out during startup. This could happen because ..."


def test_a_timed_out_start_is_retried_and_its_processes_are_killed(monkeypatch):
    real_init = ray.init
    leftovers: list[subprocess.Popen] = []

    def first_try_times_out(**kwargs):
        if not leftovers:  # what a half-started node leaves: a child process still running
            leftovers.append(subprocess.Popen(["sleep", "120"]))
            raise Exception(TIMEOUT)
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", first_try_times_out)
    try:
        start_local_ray(num_cpus=1, include_dashboard=False, logging_level="ERROR")
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 1
        assert leftovers[0].poll() is not None, "the failed try's process is still running"
    finally:
        ray.shutdown()


def test_other_errors_and_the_last_timeout_are_raised(monkeypatch):
    calls = []

    def failing(**kwargs):
        calls.append(kwargs)
        raise Exception(TIMEOUT if len(calls) > 1 else "bad argument")

    monkeypatch.setattr(ray, "init", failing)
    with pytest.raises(Exception, match="bad argument"):
        start_local_ray(num_cpus=1)
    assert len(calls) == 1
    calls.clear()
    calls.append("first")  # from here every call times out
    with pytest.raises(Exception, match="timed out during startup"):
        start_local_ray(attempts=2, num_cpus=1)
    assert len(calls) == 3
    assert all(c == {"address": "local", "num_cpus": 1} for c in calls[1:])
