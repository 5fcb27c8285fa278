"""Throwaway local servers (PostgreSQL, Prefect) and a Supabase-shaped demo source, for the demo, the tests
and the benchmark. Not used by the migration itself."""
