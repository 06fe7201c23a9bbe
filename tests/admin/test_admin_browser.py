"""End to end in headless Chromium: a host app served by uvicorn on 127.0.0.1 mounts the admin
at /admin/telemetry; the browser signs in through the host's login cookie, reads the status,
flips consent, submits and deletes, and the outbox is checked after each action. Screenshots
of every page go to artifacts/admin/.

Needs Debian's ``chromium`` and the ``playwright`` and ``uvicorn`` packages (never
``playwright install``). Skipped without them, unless WAYPOST_REQUIRE_SERVERS=1 (CI).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from waypost.privacy import StoredConsent

pytestmark = pytest.mark.server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "admin"
LOGIN_COOKIE, LOGIN_VALUE = "host_session", "admin-session-7f3a"


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    for module in ("playwright.sync_api", "uvicorn", "starlette", "jinja2"):
        try:
            __import__(module)
        except ImportError:
            return f"the Python package {module.split('.')[0]} is missing"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"browser tests are required (WAYPOST_REQUIRE_SERVERS=1) but {missing}")
        pytest.skip(f"browser tests skipped: {missing}")
    from playwright.sync_api import sync_playwright

    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_app(tel: Any) -> Any:
    """A host application: /login sets its session cookie; the admin is mounted with an auth
    callback that checks that cookie."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, RedirectResponse
    from starlette.routing import Mount, Route

    from waypost.admin import create_app

    def login(request: Any) -> Any:
        response = RedirectResponse("/admin/telemetry/", status_code=303)
        response.set_cookie(LOGIN_COOKIE, LOGIN_VALUE, httponly=True, samesite="lax")
        return response

    def home(request: Any) -> Any:
        return PlainTextResponse("host home")

    def is_admin(request: Any) -> bool:
        return request.cookies.get(LOGIN_COOKIE) == LOGIN_VALUE

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login),
            Mount("/admin/telemetry", app=create_app(tel, auth=is_admin, login_url=None)),
        ]
    )


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(tel)`` runs the host app under uvicorn on 127.0.0.1 and returns its base URL."""
    import uvicorn

    servers: list[tuple[Any, threading.Thread]] = []

    def start(tel: Any) -> str:
        port = _free_port()
        config = uvicorn.Config(
            host_app(tel), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.problems = []  # console errors (a CSP violation shows up here) and failed requests
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("requestfailed", lambda r: page.problems.append(f"failed: {r.url}"))
    yield page
    context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def counts(tel: Any) -> dict[str, dict[str, int]]:
    return dict(tel.open_outbox().counts())


def notice(page: Any) -> str:
    return str(page.locator("main [role=status], main [role=alert]").first.inner_text())


def test_admin_in_chromium(page, serve, admin_telemetry, gate):
    tel = admin_telemetry()
    tel.track("signup", {"plan": "free", "contact": "ada@example.com"})
    tel.track("<script>alert(1)</script>", {"n": 1})
    assert tel.flush(5)
    assert counts(tel) == {"jsonl": {"sent": 2}, "gate": {"pending": 2}}
    base = serve(tel)

    # Refused until the host's login says so.
    response = page.goto(f"{base}/admin/telemetry/")
    assert response.status == 403
    assert page.locator("h1").inner_text() == "Access refused"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    shot(page, "01-refused")
    page.problems.clear()  # that 403 was the point

    # Sign in through the host; the login redirects to the status page.
    page.goto(f"{base}/login")
    assert page.url == f"{base}/admin/telemetry/"
    assert page.locator("h1").inner_text() == "Status"
    assert "Telemetry is on" in page.locator("main .state").inner_text()
    gate_row = page.locator("tr", has=page.locator("th", has_text="gate"))
    assert "destination is down (503)" in gate_row.inner_text()
    assert "[secret: set]" in gate_row.inner_text()
    # The self-served stylesheet applies under the CSP (body margin 0 comes from it).
    assert page.evaluate("getComputedStyle(document.body).margin") == "0px"
    shot(page, "02-status")

    # Keyboard: the first Tab reaches the skip link.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"

    # Records: hostile names are text, remarks are shown; filter by sink and state.
    page.get_by_role("link", name="Records").click()
    assert page.locator("h1").inner_text() == "Records"
    assert page.get_by_text("<script>alert(1)</script>").count() == 2
    assert page.get_by_text("email@properties.contact").count() == 2
    page.get_by_label("Destination").select_option("gate")
    page.get_by_label("State").select_option("pending")
    page.get_by_role("button", name="Filter").click()
    assert "sink=gate" in page.url and "2 record(s)" in page.locator("main").inner_text()
    shot(page, "03-records")

    page.get_by_role("link", name="What is collected").click()
    assert page.locator("h1").inner_text() == "What is collected"
    assert page.get_by_role("table", name="The envelope").is_visible()
    shot(page, "04-manifest")

    # Consent: off, then on again; the stored choice follows.
    page.get_by_role("link", name="Consent").click()
    page.get_by_label("Off: collect nothing, send nothing").check()
    page.get_by_role("button", name="Save the choice").click()
    assert "Telemetry is now off" in notice(page)
    assert not tel.enabled and StoredConsent.read(tel.data_dir).enabled is False
    tel.track("while_off")
    assert counts(tel) == {"jsonl": {"sent": 2}, "gate": {"pending": 2}}
    shot(page, "05-consent-off")
    page.get_by_label("On: collect and send").check()
    page.get_by_role("button", name="Save the choice").click()
    assert "Telemetry is now on" in notice(page)
    assert tel.enabled and StoredConsent.read(tel.data_dir).enabled is True

    # Submit now, with the destination down: records stay pending.
    page.get_by_role("link", name="Actions").click()
    page.get_by_role("button", name="Submit now").click()
    assert "2 event(s) are still pending" in notice(page)
    assert counts(tel)["gate"] == {"pending": 2}
    # The destination is back: submit now delivers.
    gate.set()
    page.get_by_role("button", name="Submit now").click()
    assert "every pending record was delivered" in notice(page)
    assert counts(tel) == {"jsonl": {"sent": 2}, "gate": {"sent": 2}}
    shot(page, "06-actions-submitted")

    # Delete submitted records.
    tel.track("later", {"n": 2})
    gate.clear()
    assert tel.flush(5)
    assert counts(tel) == {"jsonl": {"sent": 3}, "gate": {"sent": 2, "pending": 1}}
    page.get_by_role("button", name="Delete submitted records").click()
    assert "Deleted 5 submitted record(s)." in notice(page)
    assert counts(tel) == {"gate": {"pending": 1}}

    # Delete all: the browser will not submit without the confirmation box.
    page.get_by_role("button", name="Delete all records").click()
    assert page.evaluate("document.getElementById('confirm-all').validity.valueMissing")
    assert "done=purged_sent" in page.url
    assert counts(tel) == {"gate": {"pending": 1}}
    page.get_by_label("Yes, delete every record").check()
    page.get_by_role("button", name="Delete all records").click()
    assert "Deleted 1 record(s)." in notice(page)
    assert counts(tel) == {}
    shot(page, "07-actions-deleted")

    assert page.problems == []


def test_consent_override_in_chromium(page, serve, admin_telemetry):
    tel = admin_telemetry(config={"enabled": True})
    base = serve(tel)
    page.goto(f"{base}/login")
    page.get_by_role("link", name="Consent").click()
    assert "This switch is disabled" in page.locator("#override").inner_text()
    assert page.get_by_role("button", name="Save the choice").is_disabled()
    assert page.get_by_label("Off: collect nothing, send nothing").is_disabled()
    shot(page, "08-consent-overridden")
    assert StoredConsent.read(tel.data_dir) is None and tel.enabled
    assert page.problems == []
