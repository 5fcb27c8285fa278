"""The operator's walk-through in the Prefect UI, in a real browser (Debian's chromium driven by Playwright).

What is checked is the page's text (deployment names, the form's fields, run states, the gate's table), not
pixels. Each step's screenshot is saved under the test's tmp_path and its path printed, for CI artifacts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import ROOT, fresh_runbook, serving_deployments, stop_process_group
from playwright.sync_api import expect

from liftoff.reports import artifact_key
from liftoff.runbooks.model import load_runbook

CHROMIUM = Path("/usr/bin/chromium")
RUN_TIMEOUT_MS = 180_000  # a real migrate-database run of the session stack takes well under a minute


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():  # `make test` installs it; a bare pytest run tries the same script once
        subprocess.run(["bash", str(ROOT / "scripts" / "install-system-deps.sh")], capture_output=True, timeout=600,
                       check=False)
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing and could not be installed: run scripts/install-system-deps.sh as root")
    from playwright.sync_api import sync_playwright

    expect.set_options(timeout=30_000)

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, prefect_api):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=prefect_api.ui_url)
    context.set_default_timeout(30_000)
    page = context.new_page()
    # A failed API call behind an "Oops. Something went wrong." toast: printed, so a failure's output shows it.
    page.on("response", lambda r: r.status >= 400 and print(f"HTTP {r.status} {r.request.method} {r.url}: "
                                                            f"{r.text()[:500] if r.status >= 500 else ''}"))
    yield page
    context.close()


class Screenshots:
    """Numbered screenshots of one walk-through, under the test's tmp_path."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.count = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None and not self.page.is_closed():
            self("failed")  # what the page showed when the walk-through stopped


@contextmanager
def served(command: list[str], flow_name: str, cwd: Path, log: Path):
    """Runs a process that serves a deployment of flow ``flow_name``; yields that deployment's name once the
    server lists it (not paused: a deployment whose serving process stopped is paused), and stops it after."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with serving_deployments():  # one serving process at a time on the suite's server (conftest)
        with open(log, "w") as out:
            # Polls for started runs every 2 s instead of 10 s: the test waits less, the walk-through is the same.
            proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            with get_client(sync_client=True) as client:
                while True:
                    named = FlowFilter(name=FlowFilterName(any_=[flow_name]))
                    live = [d for d in client.read_deployments(flow_filter=named) if not d.paused]
                    if live:
                        break
                    assert proc.poll() is None, f"{command} exited with {proc.returncode}; see {log}"
                    assert time.monotonic() < deadline, f"no deployment of flow {flow_name} appeared; see {log}"
                    time.sleep(1)
            yield live[0].name
        finally:
            stop_process_group(proc)


def click_to(page, locator, url: str, attempts: int = 3) -> None:
    """Clicks ``locator`` and waits for the page at ``url``. A list that re-renders (the deployments list as a
    search applies, a run list refreshing on its timer) can replace the row under the click, which then goes
    nowhere (seen in CI): the same click is made again once the page's requests have settled."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        page.wait_for_load_state("networkidle")
        locator.click()
        try:
            page.wait_for_url(url, timeout=15_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def open_deployment(page, name: str) -> None:
    page.goto("/deployments")
    page.get_by_placeholder("Search deployments").fill(name)
    click_to(page, page.get_by_role("link", name=name, exact=True).first, "**/deployments/deployment/**")
    page.get_by_role("button", name="Run", exact=True).wait_for()


def form_field(page, label: str):
    """The schema form's property labelled ``label`` (its <label> is not tied to its input by id). An object's
    property contains its fields' properties, so the innermost match (the last) is the field's own."""
    title = re.compile(rf"^{re.escape(label)}( \(Optional\))?$")
    return page.locator(".schema-form-property").filter(
        has=page.locator(".schema-form-property__label", has_text=title)).last


def flow_run_ids(flow_name: str, run_name: str | None = None) -> set[str]:
    """The ids of every flow run of flow ``flow_name`` (called ``run_name``, if given) the server has."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName

    runs_named = FlowRunFilter(name=FlowRunFilterName(any_=[run_name])) if run_name is not None else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                     flow_run_filter=runs_named)
    return {str(run.id) for run in runs}


def new_flow_run(page, flow_name: str, before: set[str], run_name: str | None = None, timeout_s: float = 90) -> str:
    """The id of the one flow run of ``flow_name`` (called ``run_name``, if given) that the server has now and
    did not have in ``before``: the run a click in the UI just created. The server's record is the proof, not
    the UI's toast, which on a loaded CI machine once did not show within 30 s. The suite's other worker
    shares the server and runs the same flows (CI once saw its migrate-database run start in the same
    second), so a run is told apart by the name typed into the form; two under that name is a double submit."""
    deadline = time.monotonic() + timeout_s
    while True:
        new = flow_run_ids(flow_name, run_name) - before
        if new:
            assert len(new) == 1, f"{len(new)} new runs of {flow_name} named {run_name!r}: {sorted(new)}"
            return new.pop()
        if time.monotonic() > deadline:
            raise AssertionError(f"the server has no new run of {flow_name} {timeout_s:.0f}s after the click; "
                                 f"the page said: {page.inner_text('body')[:2000]!r}")
        time.sleep(0.5)


def wait_for_final_state(page, timeout_ms: int = RUN_TIMEOUT_MS) -> str:
    """Waits on the flow run's page until its state badge shows a final state; returns the state's text."""
    badge = page.locator(".flow-run-header .state-badge, .page-heading .state-badge").first
    final = re.compile(r"Completed|Failed|Crashed|Cancelled")
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        text = badge.inner_text() if badge.count() else ""
        if final.search(text):
            return text.strip()
        page.wait_for_timeout(1000)
    raise AssertionError(f"flow run {page.url} did not finish within {timeout_ms / 1000:.0f}s "
                         f"(state {badge.inner_text() if badge.count() else 'unknown'})")


def test_operator_runs_the_database_deployment_from_the_ui_form_and_reads_the_gate_table(stack, page, tmp_path):
    runbook = fresh_runbook(stack, "ui_browser")
    # What the operator starts (`liftoff serve`); with PREFECT_API_URL set it uses the session's server.
    liftoff = str(Path(sys.executable).parent / "liftoff")
    with Screenshots(page, tmp_path / "screenshots") as shot, \
            served([liftoff, "serve"], "migrate-database", cwd=Path("/"), log=tmp_path / "serve.log") as name:
        # 1. Deployments: the one running the database phase (flow migrate-database) is listed.
        page.goto("/deployments")
        page.get_by_text("migrate-database", exact=True).first.wait_for()
        shot("deployments")
        assert "Can't connect to Server API" not in page.inner_text("body")

        # 2. Its page, then Run > Custom run: the form rendered from RunOptions.
        open_deployment(page, name)
        shot("deployment")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url("**/run**")
        runbook_field = form_field(page, "Runbook")
        expect(runbook_field).to_contain_text("Path of the runbook file (YAML)")  # the field's description
        run_name = page.locator(".p-label").filter(has_text="Run Name").locator("input")
        run_name.fill("ui-walkthrough")
        runbook_field.locator("textarea").fill(str(runbook))
        dry_run = form_field(page, "Dry Run").get_by_role("switch")
        expect(dry_run).to_have_attribute("aria-checked", "false")  # a real run: the gate's table is the point
        expect(run_name).to_have_value("ui-walkthrough")
        expect(runbook_field.locator("textarea")).to_have_value(str(runbook))
        shot("run-form")

        # 3. Submit: the server has a run under the name typed into the form; open its page.
        # Neither the deployment's run list (it refreshes on its own timer) nor the submit toast (on a loaded
        # CI machine it once did not show within 30 s) is what proves the form worked: the server's record is.
        before = flow_run_ids("migrate-database")
        page.get_by_role("button", name="Submit").click()
        run_id = new_flow_run(page, "migrate-database", before, run_name="ui-walkthrough")
        shot("submitted")
        page.goto(f"/runs/flow-run/{run_id}")

        # 4. The run's page: wait until it completes.
        state = wait_for_final_state(page)
        shot("run-finished")
        assert state == "Completed", f"run ended {state}; see {tmp_path / 'serve.log'}"

        # 5. The run's own page carries the gate's table (the gate runs inside migrate-database's run).
        key = artifact_key(load_runbook(runbook).name, "verify-tables")
        page.locator("li.p-tab", has_text="Artifacts").click()
        page.locator(".artifact-card").filter(has=page.get_by_text(key, exact=True)).wait_for()
        shot("run-artifacts")

        # 6. From the deployments page to the table, counting clicks: the deployment, its finished run, the run's
        # Artifacts tab, the table's card. Prefect 3.9's UI renders an artifact only on its own page, opens a run
        # on its Logs tab and links no run from the deployments list, so 4 is the fewest (it was 6: Subflow
        # Runs, the verify-database run and its Artifacts tab on the way).
        clicks = 0

        def click(locator, url: str) -> None:
            nonlocal clicks
            click_to(page, locator, url)  # one click, made again only if it landed on a row being replaced
            clicks += 1

        page.goto("/deployments")
        page.get_by_placeholder("Search deployments").fill(name)  # typing, not a click
        click(page.get_by_role("link", name=name, exact=True).first, "**/deployments/deployment/**")
        click(page.get_by_role("link", name="ui-walkthrough", exact=True).first, f"**/runs/flow-run/{run_id}**")
        page.locator("li.p-tab", has_text="Artifacts").click()
        clicks += 1
        click(page.locator(".artifact-card").filter(has=page.get_by_text(key, exact=True)), "**/artifacts/artifact/**")
        table = page.locator("table").first
        table.locator("tbody tr").first.wait_for()
        shot("verify-table")
        assert clicks == 4, clicks
        header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
        rows = [dict(zip(header, (c.strip() for c in row.locator("td").all_inner_texts())))
                for row in table.locator("tbody tr").all()]
    by_table = {row["table"]: row for row in rows}
    # The source as it is now, not as the stack was generated: tests before this one on the same worker may
    # have written to it (the cutover's writers sign users up), and the migration copied what was there.
    migrated = {name: stack.source.execute(f"SELECT count(*) FROM {name}")[0][0]
                for name in stack.counts if name.startswith("public.")}
    assert migrated.keys() <= by_table.keys(), f"not in the gate's table: {migrated.keys() - by_table.keys()}"
    for name, count in migrated.items():
        assert by_table[name]["target rows"] == str(count), by_table[name]
    assert {row["status"] for row in rows} == {"match"}, rows
    assert stack.target.execute("SELECT count(*) FROM public.bookings", dbname="ui_browser")[0][0] == \
        migrated["public.bookings"]


APPROVAL_FLOW = '''
    from prefect import flow, get_run_logger
    from prefect.flow_runs import pause_flow_run
    from prefect.input import RunInput
    from pydantic import Field


    class Approval(RunInput):
        approver: str = Field(description="Your name, for the audit trail")
        approve: bool = Field(False, description="Tick to go ahead")


    @flow(name="ui-approval")
    def ui_approval() -> str:
        answer = pause_flow_run(wait_for_input=Approval, timeout=300)
        if not answer.approve:
            raise RuntimeError(f"rejected by {answer.approver}")
        get_run_logger().info(f"approved by {answer.approver}")
        return answer.approver


    if __name__ == "__main__":
        ui_approval.serve(name="ui-approval")
'''


def test_operator_resumes_a_paused_run_from_the_ui_form(page, tmp_path):
    from prefect.client.orchestration import get_client

    (tmp_path / "approval_flow.py").write_text(textwrap.dedent(APPROVAL_FLOW))
    serve = [sys.executable, "approval_flow.py"]
    with Screenshots(page, tmp_path / "screenshots") as shot, \
            served(serve, "ui-approval", cwd=tmp_path, log=tmp_path / "serve.log") as name:
        open_deployment(page, name)
        page.get_by_role("button", name="Run", exact=True).click()
        before = flow_run_ids("ui-approval")
        page.get_by_text("Quick run", exact=True).click()
        run_id = new_flow_run(page, "ui-approval", before)
        page.goto(f"/runs/flow-run/{run_id}")

        resume = page.get_by_role("button", name="Resume", exact=True)
        resume.wait_for(timeout=60_000)  # shown once the run is Paused
        shot("paused")
        resume.click()
        form_field(page, "Approver").locator("input, textarea").first.fill("Ada Operator")
        form_field(page, "Approve").get_by_role("switch").click()
        shot("resume-form")
        page.get_by_role("dialog").get_by_role("button", name="Submit").click()

        state = wait_for_final_state(page, 60_000)
        assert state == "Completed", f"run ended {state}; see {tmp_path / 'serve.log'}"
        page.get_by_text("approved by Ada Operator").first.wait_for()  # the form's answer reached the flow
        shot("resumed")
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_completed()
