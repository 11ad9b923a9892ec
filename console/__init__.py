"""The operations console (NiceGUI): SLOs, engines, routing switches with audit, rollouts, indexes."""
