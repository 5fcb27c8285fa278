"""The operator's runbook files (YAML) and the model that validates them (``runbooks.model``)."""
