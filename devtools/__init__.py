"""Developer tooling: code generation and contract checks run by CI."""
