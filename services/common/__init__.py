"""Shared service runtime: server bootstrap, interceptors, settings, logging, metrics, tracing, errors."""
