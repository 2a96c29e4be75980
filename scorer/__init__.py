"""Scoring: corpus -> per-token target/behavior logprobs and PEAR weights in Parquet shards."""
__version__ = "0.1.0"
