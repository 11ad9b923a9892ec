"""Gateway service: the public generation API and its policy pipeline."""
