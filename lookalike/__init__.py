"""lookalike: gRPC sharded similarity search on Ray and FAISS.

This package is the base every other part builds on (configuration and limits, errors, ids and buckets, wire
formats, gRPC servers and channels, security, the shard map), and the Python client: ``from lookalike import
Client``. It imports nothing else of the project but the generated ``protos``; docs/ARCHITECTURE.md ("Packages")
shows the layers.
"""

from lookalike.client import Client, Hits

__all__ = ["Client", "Hits"]
