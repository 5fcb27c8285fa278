"""What every phase flow takes as parameters: a runbook and options, never a secret.

Prefect renders this model as the form an operator fills in when starting a run from the UI.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from liftoff.ledger import Ledger, setup_of
from liftoff.logs import bind_run, get_logger
from liftoff.runbooks.model import Runbook, load_runbook, resolve_runbook_path



class RunOptions(BaseModel):
    runbook: str = Field(
        description="Path of the runbook file (YAML). A relative path is looked up in the current directory, "
        "then in the project's runbooks/ folder.",
        examples=["runbooks/tour-crm.yaml"],
    )
    dry_run: bool = Field(False, description="Plan and report only: write nothing anywhere.")

    @model_validator(mode="before")
    @classmethod
    def _from_plain_options(cls, value: object) -> object:
        """A caller holding plain RunOptions (migrate, the rehearsal, a test) may start a flow whose form adds
        fields with defaults (backup's tier, recover's backup): its runbook and dry_run are taken as given."""
        if isinstance(value, RunOptions) and not isinstance(value, cls):
            return value.model_dump()
        return value


def open_runbook(options: RunOptions, phase: str) -> Runbook:
    """Loads the runbook and binds run context (flow run id, phase, runbook) to every later log line."""
    from prefect.runtime import flow_run

    from liftoff.reports import for_runbook
    from liftoff.runbooks.model import forget_resolved_secrets

    forget_resolved_secrets()
    runbook = load_runbook(resolve_runbook_path(options.runbook))
    if (runbook.state_dir / "ledger.sqlite").exists():  # refused before anything runs when another runbook wrote it
        Ledger(runbook.state_dir).claim_setup(setup_of(runbook))
    for_runbook(runbook.name)
    bind_run(run_id=str(flow_run.id or "local"), flow=flow_run.flow_name or phase, phase=phase,
             runbook=runbook.name, dry_run=options.dry_run)
    get_logger().info("phase started")
    return runbook
