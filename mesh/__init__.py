"""The mesh: local launcher (servemesh up), process supervision, and later Envoy and xDS."""
