"""Prefect deployments of Liftoff's flows, so operators start them from the Prefect UI."""
