"""How the router reaches its expert workers: the `Transport` interface and its local, Ray and
compiled-graph implementations, the Router actor, and the membership controller that scales,
rebalances and replaces workers."""
