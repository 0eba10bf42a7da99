"""The processes of an export: starting and stopping them, their collectives, and megatron-core's parallel state."""
