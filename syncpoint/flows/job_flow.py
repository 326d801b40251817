"""The Prefect flow decorator every syncpoint job uses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from prefect import Flow, flow, get_run_logger
from prefect.context import FlowRunContext

from syncpoint import settings
from syncpoint.core.errors import ConfigError, FatalApiError

P = ParamSpec("P")
R = TypeVar("R")

# Failures that fail the same way on every attempt until a person changes something.
NOT_RETRIED = (ConfigError, FatalApiError)


def job_flow(name: str) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """The Prefect flow decorator every syncpoint job uses.

    Deployment runs retry the whole flow (SYNCPOINT_FLOW_RETRIES, default 2, every
    SYNCPOINT_FLOW_RETRY_DELAY_SECONDS); a retry resumes from the checkpoint. A
    configuration error or a refused key fails the run without using those retries:
    waiting five minutes changes neither. Read when the flow's module is imported, i.e.
    in the worker's process.
    """
    retries, delay = settings.flow_retries()

    def decorate(body: Callable[P, R]) -> Flow[P, R]:
        @functools.wraps(body)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return body(*args, **kwargs)
            except NOT_RETRIED as exc:
                forgo_automatic_retries(exc)
                raise

        return flow(
            name=name,
            retries=retries,
            retry_delay_seconds=delay,
            log_prints=False,
            validate_parameters=True,
        )(run)

    return decorate


def forgo_automatic_retries(exc: BaseException) -> None:
    """Tell the Prefect server this run is not to be retried automatically.

    Prefect's server turns a Failed state into a scheduled retry while the run's policy
    has retries left; setting them to zero lets the failure stand. Retry in the UI still
    works, once the cause is fixed.
    """
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is None or not flow_run.empirical_policy.retries:
        return
    from prefect.client.orchestration import get_client

    policy = flow_run.empirical_policy.model_copy(update={"retries": 0})
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, empirical_policy=policy)
    get_run_logger().error(
        "%s. Not retried automatically: it would fail the same way. Fix it, then press "
        "Retry on this run.",
        exc,
    )
