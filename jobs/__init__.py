"""Catalog jobs that read a whole collection (duplicates, k-means clusters, maps), shared by shards and router."""
