"""The plan's Phase 0: every access the runbook will need, checked at once, and the apps' environment kept."""
