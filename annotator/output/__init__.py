"""Output: pass 2b: training text, token streams (Megatron), Parquet shards, statistics, the run report."""
