"""Core: what every stage shares: the stage contract, input units, output layout, durable writes, progress, tokens."""
