"""The one registry of the runbook's phases: their flows, their steps and their gate.

The CLI (``liftoff run NAME``, ``liftoff status``), the deployments (``deployments/serve.py``) and the status
report all read this list, so a new phase is added here once. Flows are named by import path and loaded
only when run, so the CLI starts without importing every phase.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseFlow:
    name: str  # what the CLI and the deployment call it: `liftoff run export`, deployment "export"
    target: str  # "module:function"
    summaries: tuple[str, ...] = ()  # artifact keys (without the runbook prefix) the CLI prints after a run

    def load(self):
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Phase:
    name: str
    title: str
    steps: tuple[str, ...]  # ledger step names, in the order they run
    flows: tuple[PhaseFlow, ...]
    gate: str | None  # the phase name its gate results are recorded under (None: runs that span phases)
    other_gates: tuple[str, ...] = ()  # gates of the phase's other flows, recorded under their own names


PHASES: tuple[Phase, ...] = (
    Phase(
        name="prepare",
        title="Phase 0: every access the runbook needs checked at once, and the apps' environment kept",
        steps=("prepare.access", "prepare.environment"),
        flows=(PhaseFlow("prepare", "liftoff.flows.prepare:prepare", ("prepare-access", "prepare-environment")),),
        gate=None,  # a missing access is input to fix (exit 2), never a difference a gate found
    ),
    Phase(
        name="database",
        title="Database: preflight, export (pg_dump), restore (pg_restore), verify",
        steps=("preflight", "export", "restore.prepare", "restore.pre-data", "restore.data", "restore.post-data",
               "restore.grants", "verify"),
        flows=(
            PhaseFlow("preflight", "liftoff.flows.preflight:preflight", ("preflight-summary",)),
            PhaseFlow("export", "liftoff.flows.export:export_database", ("export-plan",)),
            PhaseFlow("restore", "liftoff.flows.restore:restore_database", ("restore-plan",)),
            PhaseFlow("verify", "liftoff.flows.verify:verify_database", ("verify-summary",)),
            PhaseFlow("database", "liftoff.flows.database:migrate_database",
                      ("preflight-summary", "export-plan", "restore-plan", "verify-summary")),
        ),
        gate="database",
    ),
    Phase(
        name="storage",
        title="Storage: Supabase Storage to the target's S3 server (buckets, objects, verify, URL rewrite)",
        steps=("storage.buckets", "storage.copy", "verify-storage", "storage.rewrite"),
        flows=(
            PhaseFlow("storage", "liftoff.flows.storage:migrate_storage",
                      ("storage-plan", "verify-storage-summary", "storage-urls-preview")),
            PhaseFlow("verify-storage", "liftoff.flows.storage_verify:verify_storage", ("verify-storage-summary",)),
            PhaseFlow("rewrite-storage-urls", "liftoff.flows.storage_urls:rewrite_urls", ("storage-urls-preview",)),
        ),
        gate="storage",
    ),
    Phase(
        name="cutover",
        title="Cutover: checklist, approval, write freeze, final sync, switch, smoke test; and the rollback",
        steps=("cutover.checklist", "cutover.freeze", "cutover.baseline", "cutover.switch", "cutover.smoke",
               "cutover.catch-up", "rollback.freeze-target",
               "rollback.changes", "rollback.carry", "rollback.unfreeze", "rollback.switch-back",
               "storage.restore-urls", "rollback.health", "replication.preflight", "replication.full-gate",
               "replication.lag", "cutover.replicated-sync"),
        flows=(
            PhaseFlow("cutover", "liftoff.flows.cutover:cutover",
                      ("cutover-checklist", "cutover-approval", "cutover-downtime", "cutover-catch-up")),
            PhaseFlow("catch-up", "liftoff.flows.catch_up:catch_up_after_switch", ("cutover-catch-up",)),
            PhaseFlow("rollback", "liftoff.flows.rollback:rollback", ("rollback-plan", "rollback-changes")),
            PhaseFlow("resync", "liftoff.flows.resync:resync", ("export-plan", "restore-plan", "verify-summary")),
            PhaseFlow("replicate", "liftoff.flows.replication:replicate", ("replication-preflight",)),
            PhaseFlow("replication-lag", "liftoff.flows.replication:replication_lag", ("replication-lag",)),
            PhaseFlow("cleanup", "liftoff.flows.replication:cleanup_replication", ("replication-cleanup",)),
        ),
        gate="cutover",
    ),
    Phase(
        name="pooler",
        title="Pooler: PgBouncer's config from the runbook, with SCRAM authentication, and its gate",
        steps=("pooler.config", "verify-pooler"),
        flows=(PhaseFlow("pooler", "liftoff.flows.pooler:setup_pooler", ("pooler-summary",)),),
        gate="pooler",
    ),
    Phase(
        name="cache",
        title="Cache: Redis with persistence and the eviction policy the plan sets, and its gate",
        steps=("cache.config", "verify-cache"),
        flows=(PhaseFlow("cache", "liftoff.flows.cache:setup_cache", ("cache-summary",)),),
        gate="cache",
    ),
    Phase(
        name="tuning",
        title="Tuning: the target's PostgreSQL with the plan's settings for the VPS (ALTER SYSTEM), and its gate",
        steps=("tuning.apply", "verify-tuning"),
        flows=(PhaseFlow("tune", "liftoff.flows.tune:tune_postgres", ("tuning-summary",)),),
        gate="tuning",
    ),
    Phase(
        name="health",
        title="Health: every service and app answers, disk and connections under the plan's thresholds",
        steps=("health",),
        flows=(PhaseFlow("health", "liftoff.flows.health:check_health", ("health-summary",)),),
        gate="health",
    ),
    Phase(
        name="backup",
        title="Backup: pg_dump to the S3 bucket, files too, retention, every backup proven by a restore; "
              "and the recovery from a chosen backup",
        steps=("backup.dump", "backup.files", "backup.restore-test", "backup.retention", "backup.tier-database",
               "backup.tier-redis", "backup.tier-retention", "recover.fetch",
               "recover.stop-apps", "recover.safety-dump", "recover.restore", "recover.compare", "recover.put-back",
               "recover.start-apps", "pitr.configure", "pitr.backup", "pitr.check", "recover.pitr-restore"),
        flows=(
            PhaseFlow("backup", "liftoff.flows.backup:backup", ("backup-plan", "restore-test-summary", "backup-summary")),
            PhaseFlow("restore-test", "liftoff.flows.backup:restore_test", ("restore-test-summary",)),
            PhaseFlow("recover", "liftoff.flows.recover:recover", ("recover-plan", "recover-summary")),
            PhaseFlow("pitr", "liftoff.flows.pitr:pitr", ("pitr-summary",)),
        ),
        gate="backup",
        other_gates=("pitr",),  # pgbackrest check: recorded by the pitr flow
    ),
    Phase(
        name="security",
        title="Security: the VPS's firewall, listening services and files, checked over SSH",
        steps=("security",),
        flows=(PhaseFlow("security", "liftoff.flows.security:check_security", ("security-summary",)),),
        gate="security",
    ),
    Phase(
        name="watch",
        title="Watch: the plan's 24 hours after the switch, every service and app against the thresholds, alerts",
        steps=("watch.start", "watch.report"),
        flows=(PhaseFlow("watch", "liftoff.flows.watch:watch", ("watch-report",)),),
        gate="watch",
    ),
    Phase(
        name="decommission",
        title="Decommission: after the watch, Supabase archived (pg_dump and every bucket) and proven, Liftoff's "
              "slots and publications on it dropped, the project left for the operator to pause",
        steps=("decommission.start", "decommission.dump", "decommission.files", "decommission.verify",
               "decommission.manifest", "decommission.source-cleanup"),
        flows=(PhaseFlow("decommission", "liftoff.flows.decommission:decommission",
                         ("decommission-plan", "decommission-proof", "decommission-manifest",
                          "decommission-next-steps")),),
        gate="decommission",
    ),
    Phase(
        name="migration",
        title="The whole migration in order (migrate), and its scheduled dry run on scratch resources (rehearsal)",
        steps=(),  # each run's steps are its phases' (the rehearsal's in a scratch ledger of its own)
        flows=(
            PhaseFlow("migrate", "liftoff.flows.migrate:migrate", ("migrate-plan",)),
            PhaseFlow("rehearsal", "liftoff.flows.rehearsal:rehearse", ("rehearsal-report",)),
        ),
        gate=None,
    ),
)


def all_flows() -> dict[str, PhaseFlow]:
    return {f.name: f for phase in PHASES for f in phase.flows}


def phase_of(flow_name: str) -> Phase:
    return next(p for p in PHASES if any(f.name == flow_name for f in p.flows))
