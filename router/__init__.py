"""The router: lookalike's public gRPC front door, fanning out to shards and merging their answers."""
