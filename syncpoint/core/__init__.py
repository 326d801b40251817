"""The core: errors, secrets, the database and its schema, the ledger, the HTTP boundary,
pacing and stop signals. It imports nothing above it (tests/unit/test_layers.py)."""
