"""Engine backends: one module per implementation of engines.base.Engine."""
