"""The cutover phase's steps (runbook step 6) and the rollback's: each a Prefect task recorded in the ledger."""
