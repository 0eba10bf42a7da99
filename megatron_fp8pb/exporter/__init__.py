"""The export pass: units planned, split, quantized with shard-consistent scales, gathered and written in order."""
