"""The mesh's Envoy data plane: configuration builders (config) and supervised processes (process)."""
