"""The engine: a run's lifecycle (JobRun), the batch map and the cursor stream, and how a
run is shown (run page, status reports). It submits the Prefect tasks in syncpoint.tasks."""
