"""The block-FP8 format and its quantizers: the reference, the Triton kernel, and the block math they share."""
