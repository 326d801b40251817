"""The Prefect flow decorator every syncpoint job uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import Flow, flow

from syncpoint import settings

P = ParamSpec("P")
R = TypeVar("R")


def job_flow(name: str) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """The Prefect flow decorator every syncpoint job uses.

    Deployment runs retry the whole flow (SYNCPOINT_FLOW_RETRIES, default 2, every
    SYNCPOINT_FLOW_RETRY_DELAY_SECONDS); a retry resumes from the checkpoint. Read when
    the flow's module is imported, i.e. in the worker's process.
    """
    retries, delay = settings.flow_retries()
    return flow(
        name=name,
        retries=retries,
        retry_delay_seconds=delay,
        log_prints=False,
        validate_parameters=True,
    )
