"""Where a run came from, and so what a person should do to continue it.

A run started from a deployment (the Prefect UI's Run button, a schedule, `prefect
deployment run`) is watched on its run page, and continued there with Retry; a run of
the `syncpoint` command (an in-process flow run without a deployment) is continued by
running the command again. Every hint syncpoint prints or logs is decided here, so the
two never get each other's advice.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class Origin:
    flow_run_id: UUID | None
    # Prefect's run_count: 1 for a flow run's first attempt, 2 after one retry, ...
    attempt: int
    from_deployment: bool

    @classmethod
    def current(cls) -> Origin:
        """The flow run this code runs in; outside one, a plain command-line origin."""
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        flow_run = context.flow_run if context is not None else None
        if flow_run is None:
            return cls(None, 1, False)
        return cls(flow_run.id, max(1, flow_run.run_count), flow_run.deployment_id is not None)

    @property
    def retried(self) -> bool:
        return self.attempt > 1

    def resume_hint(self, command: str, done: int | None = None) -> str:
        """How to continue this run: Retry on the run page, or the same command again.

        `done` (items already done, if known) is what a retry will not fetch again.
        """
        if self.from_deployment:
            skips = f" (it skips the {done} items already done)" if done else ""
            return f"Press Retry on this run to continue{skips}."
        return f"Resume with: {command}"
