"""The security phase: the VPS's exposure checked over SSH (firewall, listeners, secrets in files)."""
