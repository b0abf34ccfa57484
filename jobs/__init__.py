"""Catalog jobs: questions asked of a whole collection (near-duplicate groups, k-means clusters and the map built
on them), run over the sharded index by a router.

- ``jobs.dedup``: every item searched against the whole collection; pairs within a threshold joined into groups.
- ``jobs.kmeans``: FAISS k-means on a sample, then every shard labels its own items with their nearest centroid.
- ``jobs.manager``: :class:`JobManager` runs jobs on threads and keeps them (and their checkpoints) in storage.
- ``jobs.base``: what the jobs share (states, :class:`JobStatus`, the page plan).

The public surface, what the other packages use, is exported here: shards label items with
:func:`cluster_space`, :func:`check_centroids` and :func:`set_payload_field`; the control plane runs a
:class:`JobManager`; the router's server reports a :class:`JobStatus`. Import those from ``jobs``, not from its
modules.

Layer: above lookalike and encoder, below shard (jobs use a router passed in, never import it).
"""

from jobs.base import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStatus
from jobs.kmeans import MAX_CLUSTERS, check_centroids, cluster_space, set_payload_field
from jobs.manager import JobManager

__all__ = ["CANCELLED", "FAILED", "RUNNING", "SUCCEEDED", "JobStatus", "MAX_CLUSTERS", "check_centroids",
           "cluster_space", "set_payload_field", "JobManager"]
