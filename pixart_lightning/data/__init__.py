"""Data: the synthetic shapes world, shard reading/writing, aspect-ratio buckets."""
