"""Training from scored shards: weighted SFT, then RL."""
