"""Serving front ends of the router: the HTTP ingress (Ray Serve) and the gRPC server."""
