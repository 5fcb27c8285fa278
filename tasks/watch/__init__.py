"""The watch after the switch: rounds of checks against the plan's thresholds, alerts, and its report."""
