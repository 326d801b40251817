"""The Prefect tasks: fetch and store a batch, read and store a stream segment, resolve a
run's universe. Their bodies call the core and the sources; the engine submits them."""
