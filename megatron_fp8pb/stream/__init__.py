"""The in-memory stream's parts: rank 0's sink and assembler (``sink``), buckets of pairs (``buckets``)."""
