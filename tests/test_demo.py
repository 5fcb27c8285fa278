"""`liftoff demo`, the README's first command, end to end: exit 0 only when both gates passed."""

from __future__ import annotations

from conftest import run_cli


def test_demo_migrates_a_local_supabase_shaped_database_and_its_files_and_prints_both_gates(prefect_api):
    done = run_cli("demo", "--bookings", "300")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Database gate PASSED" in done.stdout
    assert "public.bookings" in done.stdout and "match" in done.stdout
    assert "Storage gate PASSED" in done.stdout and "tour-images" in done.stdout and "waivers" in done.stdout
    assert f"{prefect_api.ui_url}/runs" in done.stdout
