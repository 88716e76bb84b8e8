"""The command layer: one module per console script over `common` (errors, exit codes, signals)."""
