"""The restore adds foreign keys NOT VALID and validates them after, in parallel: the target ends with every
key exactly as valid as the source's, also when a run died between the two."""

from __future__ import annotations

import pytest

from helpers import fresh_runbook
from liftoff.errors import GateFailed
from liftoff.flows.database import migrate_database
from liftoff.flows.options import RunOptions
from liftoff.flows.verify import verify_database
from liftoff.ledger import Ledger
from liftoff.runbooks.model import load_runbook

VALIDITY = """SELECT c.relname || '.' || k.conname, k.convalidated FROM pg_constraint k
              JOIN pg_class c ON c.oid = k.conrelid WHERE k.contype = 'f'
              AND c.relnamespace = 'public'::regnamespace ORDER BY 1"""


@pytest.fixture
def source_key_not_valid(stack):
    """A key the source holds NOT VALID (added to the live source for this test, dropped after it)."""
    stack.source.execute("ALTER TABLE public.waivers ADD CONSTRAINT waivers_schedule_unchecked "
                         "FOREIGN KEY (customer_id) REFERENCES public.customers (id) NOT VALID")
    yield "waivers.waivers_schedule_unchecked"
    stack.source.execute("ALTER TABLE public.waivers DROP CONSTRAINT waivers_schedule_unchecked")


def test_keys_end_as_valid_as_the_source_and_a_rerun_validates_what_a_dead_run_left(stack, source_key_not_valid):
    runbook = fresh_runbook(stack, "fk_validity")
    migrate_database(RunOptions(runbook=str(runbook)))
    source = dict(stack.source.execute(VALIDITY))
    assert source[source_key_not_valid] is False and sum(source.values()) >= 5, source
    assert dict(stack.target.execute(VALIDITY, dbname="fk_validity")) == source
    ledger = Ledger(load_runbook(runbook).state_dir)
    detail = ledger.step_detail("restore.post-data")
    assert detail["foreign_keys_added"] == len(source)
    assert detail["foreign_keys_validated"] == len(source) - 1  # all but the one the source left NOT VALID

    # A run that died after adding a key and before validating it: the target holds it NOT VALID.
    stack.target.execute("ALTER TABLE public.payments DROP CONSTRAINT payments_booking_id_fkey; "
                         "ALTER TABLE public.payments ADD CONSTRAINT payments_booking_id_fkey "
                         "FOREIGN KEY (booking_id) REFERENCES public.bookings (id) NOT VALID", dbname="fk_validity")
    with pytest.raises(GateFailed) as caught:  # the gate sees the difference
        verify_database(RunOptions(runbook=str(runbook)))
    assert "payments_booking_id_fkey" in str(caught.value) and "NOT VALID" in str(caught.value)
    ledger.forget_steps("restore.post-data")
    migrate_database(RunOptions(runbook=str(runbook)))
    detail = ledger.step_detail("restore.post-data")
    assert (detail["foreign_keys_added"], detail["foreign_keys_validated"]) == (0, 1)
    assert dict(stack.target.execute(VALIDITY, dbname="fk_validity")) == source
