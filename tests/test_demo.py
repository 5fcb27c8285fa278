"""`liftoff demo`, the README's first command, end to end: exit 0 only when both gates passed."""

from __future__ import annotations

from helpers import run_cli


def test_demo_migrates_database_and_files_prints_both_gates_then_cuts_over_and_rolls_back(prefect_api):
    done = run_cli("demo", "--bookings", "300")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Database gate PASSED" in done.stdout
    assert "public.bookings" in done.stdout and "match" in done.stdout
    assert "Storage gate PASSED" in done.stdout and "tour-images" in done.stdout and "waivers" in done.stdout
    assert f"{prefect_api.ui_url}/runs" in done.stdout
    # then the cutover, measured, and the rollback
    assert "Downtime (writes frozen until the apps were healthy on the target)" in done.stdout
    assert "cutover: the app is now connected to database 'postgres' on port" in done.stdout
    assert "(the target); " in done.stdout and "rolling back, carrying them to the source" in done.stdout
    # sign-ups and uploads kept arriving on Supabase through the cutover: the catch-up carried them
    assert "Catch-up after the switch: passed" in done.stdout and "table auth.users" in done.stdout
    # the app's two inserts, one update and one delete on the target went back to the source
    assert "Changes from the target: 4" in done.stdout and "applied to the source (4 carried, 0 conflict(s))" in done.stdout
    assert "(the source) again, which takes writes again" in done.stdout
