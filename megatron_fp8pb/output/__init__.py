"""What the export writes: assembled tensors in sharded safetensors, the writers per node, and the non-tensor
files."""
