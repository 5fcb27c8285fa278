"""What a switch driver does: change the apps' environment, redeploy them, and undo both.

The cutover changes the apps' environment (``DATABASE_URL`` through PgBouncer, ``DIRECT_URL``, ``REDIS_URL``,
``S3_ENDPOINT``, ``S3_PUBLIC_URL`` ...) through one driver; the rollback undoes it through the same one, from
the undo record the driver returned, which the ledger's event log keeps. Two drivers: an env file on the VPS
over SSH (``liftoff.systems.remote.EnvFileSwitch``) and Coolify's API (``liftoff.systems.coolify.CoolifySwitch``);
both also stop and start the apps for the recovery.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from liftoff.errors import StepFailed


class SwitchDriver(ABC):
    #: where the driver acts, for messages and the audit trail (never a secret)
    where: str

    @abstractmethod
    def apply_env(self, changes: dict[str, str]) -> dict:
        """Sets these variables (others are kept) and returns the undo record: plain JSON that lets
        ``restore_env`` put back exactly the previous environment. Idempotent: applying the same changes
        again changes nothing and returns an undo record that still restores the environment before the
        first apply."""

    @abstractmethod
    def restore_env(self, undo: dict) -> None:
        """Puts back the environment ``apply_env`` found, from its undo record. Idempotent."""

    @abstractmethod
    def read_env(self) -> dict[str, dict[str, str | None]]:
        """Every app's whole current environment, ``{app: {KEY: value}}`` (None: a value the driver cannot
        read back). Reads only: the snapshot the prepare flow keeps before anything changes."""

    @abstractmethod
    def redeploy(self) -> None:
        """Restarts or redeploys the apps with their current environment and returns once the restart or
        deployment finished (not once the apps are healthy: the caller polls their health)."""

    def stop_apps(self) -> None:
        """Stops the apps and returns once they stopped (the recovery replaces their database meanwhile)."""
        raise StepFailed(f"the switch driver at {self.where} cannot stop the apps: stop them by hand before a "
                         "recovery")

    def start_apps(self) -> None:
        """Starts the apps ``stop_apps`` stopped, with their current environment; returns once started (not
        once healthy: the caller polls their health)."""
        raise StepFailed(f"the switch driver at {self.where} cannot start the apps: start them by hand")

    def close(self) -> None:
        """Releases connections."""

    def __enter__(self) -> "SwitchDriver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
