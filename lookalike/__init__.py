"""lookalike: gRPC sharded similarity search on Ray and FAISS."""
