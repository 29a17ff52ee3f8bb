"""How the cluster is started: the `ray start` launcher (`python -m cluster up|status|down`), the
Ray Serve application builder and its config, the docker-compose test, and the KubeRay manifest."""
