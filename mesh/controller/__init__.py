"""The mesh's controller: progressive rollouts (rollouts.py) and SLOs, served as one process (server.py)."""
