"""Prefect step tasks, one package per phase; each step composes building blocks (``liftoff.systems``)."""
