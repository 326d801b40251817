"""The sources: one module per API dataset, turning answers into validated rows."""
