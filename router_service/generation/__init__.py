"""Generation in the router: continuously batched decoding (`decoding`) and the queue and loop
that feed it (`scheduler`)."""
