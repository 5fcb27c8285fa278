"""The health phase's checks (services, apps, the VPS) and their thresholds."""
