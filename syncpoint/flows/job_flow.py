"""The Prefect flow decorator every syncpoint job uses, and the types of its parameters.

Three things a person meets in the Prefect UI are settled here, once for every job:
- the Custom run form: each parameter has a type the form can render (a date picker for
  dates, a number field for counts) and no "None" switch. A setting left empty means
  "not given here" (the block, the worker's environment or the default decide, as for
  the CLI); in Python that is None, in the parameter schema it is a field with no default;
- the run's name says what it syncs ("daily-sync 2026-11-20"), not "omega4-tauri-sector";
- the run's log reads as a story: Prefect's per-task "Finished in state Completed()"
  lines are dropped for syncpoint's tasks, and an expected failure (a SyncError, already
  explained by the run's last line) is not dumped again with a traceback. A bug keeps
  its traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from datetime import date
from typing import Annotated, Any, ParamSpec, TypeVar

from prefect import Flow, flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import BeforeValidator, WithJsonSchema
from pydantic.json_schema import PydanticJsonSchemaWarning

from syncpoint import settings
from syncpoint.core.errors import ConfigError, FatalApiError, SyncError
from syncpoint.engine.job_run import explained, is_explained

P = ParamSpec("P")
R = TypeVar("R")

# Failures that fail the same way on every attempt until a person changes something.
NOT_RETRIED = (ConfigError, FatalApiError)


# --- parameters the Custom run form can render --------------------------------------------


class _Unset:
    """The default of a setting the run does not give: the flow sees None.

    Why not plain None: pydantic would write `"default": null` into the parameter
    schema, and the Prefect UI then either offers a "None" switch (for `int | None`) or
    fills the field with null and refuses to submit it ("None is not of type integer").
    A default pydantic cannot serialize is left out of the schema, so the field starts
    empty and an empty field is simply not sent.
    """

    def __repr__(self) -> str:
        return "syncpoint-unset"


UNSET: Any = _Unset()

# Pydantic warns that it left the default out: that is the point, so say nothing.
warnings.filterwarnings(
    "ignore",
    message=r"Default value syncpoint-unset is not JSON serializable",
    category=PydanticJsonSchemaWarning,
)


def _unset_is_none(value: Any) -> Any:
    return None if isinstance(value, _Unset) else value


# On each type below: the validator turns the sentinel into None before the type is
# checked; the schema is what the UI renders (one type: one field, no "None" switch).
UNSET_IS_NONE = BeforeValidator(_unset_is_none)

# A whole number of at least 1; empty: not given.
Count = Annotated[int | None, UNSET_IS_NONE, WithJsonSchema({"type": "integer", "minimum": 1})]
# Seconds, more than 0; empty: not given.
Seconds = Annotated[
    float | None, UNSET_IS_NONE, WithJsonSchema({"type": "number", "exclusiveMinimum": 0})
]
# A calendar day (the UI shows a date picker); empty: the flow's own default day.
Day = Annotated[date | None, UNSET_IS_NONE, WithJsonSchema({"type": "string", "format": "date"})]
# A name or a path; empty: not given.
Text = Annotated[str | None, UNSET_IS_NONE, WithJsonSchema({"type": "string"})]
# A list of names; empty: not given.
Texts = Annotated[
    list[str] | None,
    UNSET_IS_NONE,
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]
# On or off, with a real default; None (an option the CLI was not given) counts as off.
Switch = Annotated[
    bool, BeforeValidator(lambda v: False if v is None else v), WithJsonSchema({"type": "boolean"})
]


# --- the decorator ---------------------------------------------------------------------------

# The flows job_flow made: their runs' logs get the filters below.
JOB_NAMES: set[str] = set()


def job_flow(
    name: str,
    run_name: Callable[[Mapping[str, Any]], str] | None = None,
    persist_result: bool | None = None,
) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """The Prefect flow decorator every syncpoint job uses.

    `run_name(parameters)` names each flow run after what it syncs (parameters as the run
    was given them: strings or dates, missing or None when not given).

    Deployment runs retry the whole flow (SYNCPOINT_FLOW_RETRIES, default 2, every
    SYNCPOINT_FLOW_RETRY_DELAY_SECONDS); a retry resumes from the checkpoint. A
    configuration error or a refused key fails the run without using those retries:
    waiting five minutes changes neither. Read when the flow's module is imported, i.e.
    in the worker's process. `persist_result` is Prefect's: a result another flow run
    reads back must be persisted.
    """
    retries, delay = settings.flow_retries()
    JOB_NAMES.add(name)

    def decorate(body: Callable[P, R]) -> Flow[P, R]:
        @functools.wraps(body)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            quiet_prefect_logs()
            # Prefect leaves the defaults of parameters not given unvalidated.
            given = {k: _unset_is_none(v) for k, v in kwargs.items()}
            try:
                return body(*args, **given)
            except NOT_RETRIED as exc:
                forgo_automatic_retries(exc)
                raise

        # Prefect validates parameters against the wrapper's signature; its annotations
        # are strings (postponed) naming types of the flow's module, not of this one.
        run.__signature__ = inspect.signature(body, eval_str=True)  # type: ignore[attr-defined]
        return flow(
            name=name,
            flow_run_name=_namer(name, run_name) if run_name else None,
            retries=retries,
            retry_delay_seconds=delay,
            log_prints=False,
            validate_parameters=True,
            persist_result=persist_result,
        )(run)

    return decorate


def _namer(job: str, run_name: Callable[[Mapping[str, Any]], str]) -> Callable[[], str]:
    def name() -> str:
        context = FlowRunContext.get()
        given = dict(context.parameters or {}) if context is not None else {}
        try:
            return run_name({k: _unset_is_none(v) for k, v in given.items()})
        except Exception:  # a bad parameter is reported by the run itself, in one line
            return job

    return name


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


# --- the run's log as a person reads it ------------------------------------------------------


class QuietTaskStates(logging.Filter):
    """Drops Prefect's "Finished in state Completed()" line of each syncpoint task run.

    A run of 100 batches logs 200 of them, burying the progress lines; a task that
    failed still logs its state (at ERROR), without a traceback if the failure is a
    SyncError (the flow explains it), and the flow's own state line stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ours(record):
            return True
        if record.levelno <= logging.INFO and str(record.msg).startswith("Finished in state"):
            return False
        if record.exc_info and isinstance(record.exc_info[1], SyncError):
            record.exc_info, record.exc_text = None, None
        return True


class ExplainedFailures(logging.Filter):
    """An expected failure without Prefect's traceback.

    Prefect logs a flow's exception as "Encountered exception during execution" with a
    traceback. A SyncError is an outcome syncpoint explains: if the run already said so
    in its last line, the record is dropped; otherwise it becomes that one line. Any
    other exception is a bug and keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, SyncError) or not _ours(record):
            return True
        if is_explained(exc):
            return False
        record.msg, record.args = "%s", (str(exc),)
        record.exc_info, record.exc_text = None, None
        explained(exc)  # said now: Prefect's engine logs it once more on its way out
        return True


def _ours(record: logging.LogRecord) -> bool:
    """A record of a syncpoint flow's run. The engine's outermost logger, which logs the
    exception a deployment's run ended with a second time ("Engine execution exited
    with unexpected exception"), is made before the flow is loaded: it says "<unknown>"."""
    return getattr(record, "flow_name", "<unknown>") in (*JOB_NAMES, "<unknown>")


def quiet_prefect_logs() -> None:
    """Install the filters above on Prefect's run loggers, once per process."""
    for name, kind in (
        ("prefect.task_runs", QuietTaskStates),
        ("prefect.flow_runs", ExplainedFailures),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
