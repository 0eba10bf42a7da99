"""What each rank exports: the parallel layout, each local Megatron parameter's HF pieces, and the TP slices and
fused splits between them."""
