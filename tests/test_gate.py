"""The database gate must fail when the data differ: each test corrupts a copy of a good migration."""

from __future__ import annotations

import itertools

import pytest

from helpers import fresh_runbook
from liftoff.flows.options import RunOptions
from liftoff.flows.verify import verify_database
from liftoff.errors import GateFailed

_names = itertools.count()


@pytest.fixture
def copy_of_migrated(stack, migrated):
    """A copy of the good migration's target database, with a runbook pointing at it."""
    name = f"gate{next(_names)}"
    runbook = fresh_runbook(stack, name, template="migrated")
    return name, runbook


def _gate(runbook) -> str:
    with pytest.raises(GateFailed) as failed:
        verify_database(RunOptions(runbook=str(runbook)))
    return str(failed.value)


def test_gate_passes_on_an_untouched_copy(stack, copy_of_migrated):
    _, runbook = copy_of_migrated
    public_tables = [t for t in stack.counts if t.startswith("public.")]
    # every migrated table, and the shim's auth.users
    assert verify_database(RunOptions(runbook=str(runbook)))["tables"] == len(public_tables) + 1


def test_changed_value_in_one_row_is_caught_with_its_key(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    key = stack.target.execute("SELECT id::text FROM public.customers ORDER BY id LIMIT 1 OFFSET 7", dbname=db)[0][0]
    stack.target.execute(f"UPDATE public.customers SET full_name = full_name || '.' WHERE id = '{key}'", dbname=db)
    message = _gate(runbook)
    assert "table public.customers: content differs" in message
    assert f"changed: key {key}" in message


def test_one_flipped_character_in_jsonb_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("UPDATE public.tours SET meeting_point = meeting_point || '{\"x\": 1}' WHERE id = 3", dbname=db)
    message = _gate(runbook)
    assert "table public.tours: content differs" in message and "changed: key 3" in message


def test_deleted_row_is_caught_as_missing(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    key = stack.target.execute("SELECT id::text FROM public.booking_events ORDER BY id DESC LIMIT 1", dbname=db)[0][0]
    stack.target.execute(f"DELETE FROM public.booking_events WHERE id = {key}", dbname=db)
    message = _gate(runbook)
    assert "table public.booking_events: row count differs" in message
    assert f"missing on target: key {key}" in message


def test_extra_row_on_target_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("INSERT INTO public.guides (full_name, email) SELECT full_name, 'extra@example.com' "
                         "FROM public.guides LIMIT 1", dbname=db)
    message = _gate(runbook)
    assert "table public.guides: row count differs" in message and "extra on target" in message


def test_dropped_index_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("DROP INDEX public.bookings_customer_id_idx", dbname=db)
    assert "index missing on target: public.bookings_customer_id_idx" in _gate(runbook)


def test_stale_sequence_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("SELECT setval('public.tours_id_seq', 1)", dbname=db)
    message = _gate(runbook)
    assert "sequence public.tours_id_seq: next value 2 is not above max(public.tours.id)" in message


def test_dropped_trigger_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("DROP TRIGGER bookings_audit ON public.bookings", dbname=db)
    assert "trigger missing on target: public.bookings.bookings_audit" in _gate(runbook)


def test_dropped_table_is_caught(stack, copy_of_migrated):
    db, runbook = copy_of_migrated
    stack.target.execute("DROP TABLE public.tour_images", dbname=db)
    message = _gate(runbook)
    assert "table public.tour_images: row count differs" in message
    assert "table missing on target: public.tour_images" in message
