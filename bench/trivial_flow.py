"""A bare Prefect flow, started the way the CLI starts a run: the start-up yardstick.

`python -m bench.trivial_flow` imports Prefect, creates one flow run on the API the
environment names (PREFECT_API_URL), and ends. Its wall time is what any Prefect flow
costs before doing anything, so a no-op syncpoint run is judged by its time beyond this.
"""

from __future__ import annotations

from prefect import flow


@flow(name="bench-trivial", log_prints=False)
def trivial() -> int:
    return 0


if __name__ == "__main__":
    raise SystemExit(trivial())
