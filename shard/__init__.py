"""Shard servers: slices of collections in in-memory FAISS indexes, backed by durable storage."""
