"""The dashboard: default deny, the admin pages' guard and headers, each chart as JSON and SVG,
and the page in headless Chromium (Debian's, through Playwright) with screenshots kept in
artifacts/collector/."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import REPO, base_section, envelope, signed_headers, wait_for, write_config

from waypost.admin.security import CSP

PASSWORD = "dashboard-password-42"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts" / "collector"


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _fleet(url: str, days: int = 90) -> int:
    """A fleet's last ``days``: installations joining over time on three versions, two OSes."""
    today = _dt.datetime.now(_dt.timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    sent = 0
    batch: list[dict[str, Any]] = []
    for day in range(days):
        when = (today - _dt.timedelta(days=day)).isoformat().replace("+00:00", "Z")
        for inst in range(max(1, (days - day) // 6)):
            version = ("1.4.0", "1.5.2", "2.0.0")[inst % 3 if day < 30 else 0]
            context = {
                "app": {"name": "myapp", "version": version},
                "os": {"type": ("Linux", "Darwin", "Windows")[inst % 5 % 3]},
                "python": ("3.12.4", "3.11.9")[inst % 2],
            }
            for name in ("run", "heartbeat") if inst % 2 else ("run",):
                batch.append(
                    envelope(name=name, timestamp=when, instance_id=f"inst-{inst}", context=context)
                )
            if len(batch) >= 400:
                sent += _post(url, batch)
                batch = []
    if batch:
        sent += _post(url, batch)
    return sent


def _post(url: str, batch: list[dict[str, Any]]) -> int:
    body = json.dumps(batch).encode()
    answer = httpx.post(url, content=body, headers=signed_headers(body), timeout=30)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["accepted"])


@pytest.fixture
def dashboard(tmp_path: Path, serve: Any) -> Iterator[Any]:
    section = base_section(
        tmp_path / "d",
        dashboard={"password": PASSWORD},
        limits={"per_installation": None, "max_events": 1000},
    )
    section["apps"]["other"] = {"token": "tok-other-12345678"}
    served = serve(write_config(tmp_path / "c.yml", section))
    sent = _fleet(served.url + "/v1/myapp/events")
    bad = json.dumps([envelope(name=""), envelope(timestamp="never")]).encode()
    httpx.post(served.url + "/v1/myapp/events", content=bad, headers=signed_headers(bad))
    httpx.post(served.url + "/v1/myapp/events", content=b"[]")  # no token
    wait_for(lambda: served.collector.spool.lag() is None and sent, 60, "storage to catch up")
    yield served


def test_default_deny_without_a_password(tmp_path: Path, serve: Any) -> None:
    served = serve(write_config(tmp_path / "c.yml", base_section(tmp_path / "d")))
    for path in ("/dashboard/", "/dashboard/dashboard.css", "/dashboard/charts/os.json"):
        response = httpx.get(served.url + path, headers=_basic("admin", PASSWORD))
        assert response.status_code == 403, path
        assert response.headers["content-security-policy"] == CSP
        assert "no auth callback" in response.text


def test_basic_auth_headers_and_charts(dashboard: Any) -> None:
    url = dashboard.url + "/dashboard/"
    refused = httpx.get(url)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(url, headers=_basic("admin", "wrong-password-000")).status_code == 401
    assert httpx.get(url, headers=_basic("root", PASSWORD)).status_code == 401
    page = httpx.get(url, headers=_basic("admin", PASSWORD))
    assert page.status_code == 200
    for header in ("content-security-policy", "x-frame-options", "x-content-type-options"):
        assert header in page.headers
    assert page.headers["content-security-policy"] == CSP
    html = page.text
    assert html.count("<svg") == 7 and "<script" not in html and "style=" not in html
    auth = _basic("admin", PASSWORD)
    daily = httpx.get(dashboard.url + "/dashboard/charts/active_daily.json?app=myapp", headers=auth)
    points = daily.json()["series"][0]["points"]
    assert len(points) == 90 and points[-1][1] == 15 and points[0][1] == 1
    weekly = httpx.get(dashboard.url + "/dashboard/charts/active_weekly.json", headers=auth).json()
    assert len(weekly["points"]) == 13 and max(y for _, y in weekly["points"]) == 15
    versions = httpx.get(dashboard.url + "/dashboard/charts/versions.json", headers=auth).json()
    assert {i["label"] for i in versions["items"]} == {"1.4.0", "1.5.2", "2.0.0"}
    assert abs(sum(i["share"] for i in versions["items"]) - 1) < 0.01
    events = httpx.get(dashboard.url + "/dashboard/charts/events.json", headers=auth).json()
    assert {s["name"] for s in events["series"]} == {"run", "heartbeat"}
    refusals = httpx.get(dashboard.url + "/dashboard/charts/refusals.json", headers=auth).json()
    assert {i["label"]: i["value"] for i in refusals["items"]} == {
        "malformed": 2,
        "bad_token (request)": 1,
    }
    svg = httpx.get(dashboard.url + "/dashboard/charts/os.svg", headers=auth)
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.startswith("<svg") and "Linux" in svg.text
    other = httpx.get(dashboard.url + "/dashboard/charts/os.json?app=other", headers=auth).json()
    assert other["items"] == []  # one app's events never show in another's charts
    missing = httpx.get(dashboard.url + "/dashboard/charts/os.json?app=nope", headers=auth)
    assert missing.status_code == 404


def test_a_host_check_replaces_basic_auth(tmp_path: Path, serve: Any) -> None:
    section = base_section(tmp_path / "d", dashboard={"password": PASSWORD})

    async def staff_only(request: Any) -> bool:
        return request.cookies.get("staff") == "yes"

    served = serve(write_config(tmp_path / "c.yml", section), dashboard_auth=staff_only)
    url = served.url + "/dashboard/"
    assert httpx.get(url, headers=_basic("admin", PASSWORD)).status_code == 403
    assert httpx.get(url, cookies={"staff": "yes"}).status_code == 200


def _browser() -> Any:
    missing = None
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        missing = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the Python package playwright is missing"
    if missing:
        if os.environ.get("WAYPOST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"browser tests are required (WAYPOST_REQUIRE_SERVERS=1) but {missing}")
        pytest.skip(f"browser tests skipped: {missing}")
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


@pytest.mark.server
def test_in_chromium(dashboard: Any) -> None:
    executable = _browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args, headless=True)
        try:
            refused = browser.new_context()
            # A browser without the password is asked for it (and shown nothing).
            asked = refused.request.get(dashboard.url + "/dashboard/")
            assert asked.status == 401 and "Basic" in asked.headers["www-authenticate"]
            refused.close()
            context = browser.new_context(
                http_credentials={"username": "admin", "password": PASSWORD},
                viewport={"width": 1500, "height": 1200},
            )
            page = context.new_page()
            blocked: list[str] = []
            page.on("console", lambda m: blocked.append(m.text) if "Refused" in m.text else None)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            answer = page.goto(dashboard.url + "/dashboard/?app=myapp")
            assert answer is not None and answer.status == 200
            page.wait_for_selector("figure#refusals svg")
            assert page.locator("figure svg").count() == 7
            # The stylesheet applied (CSP allows 'self' only) and nothing else was fetched.
            colour = page.evaluate(
                "getComputedStyle(document.querySelector('header')).backgroundColor"
            )
            assert colour == "rgb(26, 54, 93)"
            assert all(u.startswith(dashboard.url) for u in requests), requests
            assert blocked == []
            box = page.locator("figure#active_daily svg polyline").first.bounding_box()
            assert box is not None and box["width"] > 500
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.locator("figure#versions").screenshot(path=str(ARTIFACTS / "versions.png"))
            page.goto(dashboard.url + "/dashboard/charts/active_daily.svg?app=myapp")
            page.screenshot(path=str(ARTIFACTS / "active_daily.png"))
            context.close()
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
