"""The operator's runbook files (YAML) and the model that validates them (``liftoff.runbooks.model``)."""
