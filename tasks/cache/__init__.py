"""The cache phase: Redis on the target, configured and checked."""
