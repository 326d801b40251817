"""The Prefect flows, one module per job; prefect.yaml's entrypoints point at them."""
