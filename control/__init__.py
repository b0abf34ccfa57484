"""The control plane: the controller (shard map, placement, bucket moves, trainings), the Ray actors and cluster
start-up, and the in-process cluster used by tests and `lookalike serve --local`."""
