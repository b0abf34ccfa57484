"""The control plane: the controller (shard map, placement, bucket moves, trainings), the Ray actors and cluster
start-up, and the in-process cluster used by tests and `lookalike serve --local`.

- ``controller``: the :class:`Controller` facade over its parts: ``state`` (the persisted cluster state),
  ``roster`` (shards), ``registry`` (collections), ``moves`` (rebalancing), ``growth``, ``training``;
  ``placer`` is the interface it starts shards through.
- Ray: ``ray_cluster`` (start, join, stop), ``ray_actors`` (controller and jobs actors and their views),
  ``ray_shard`` (the shard actor), ``ray_placer`` (placing shard actors), ``ray_encoders``, ``ray_common``.
- ``local``: a whole cluster in one process, without Ray.

Layer: the top of the server side; it may import shard, router, jobs and lookalike.
"""
