"""Service level objectives: definitions (config), continuous evaluation from the gateways'
metrics (evaluator), the SloService servicer, and the Prometheus rules generated from the
same definitions (rules)."""
