"""The admin app through Starlette's TestClient: auth, CSRF, headers, escaping, secrets,
consent, records, manifest and actions (each action checked against the outbox)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

import waypost
from waypost.privacy import StoredConsent

REASON = "waypost.admin needs the admin extra: pip install 'waypost[admin]'"
pytest.importorskip("starlette", reason=REASON)
pytest.importorskip("jinja2", reason=REASON)

from waypost.admin import CSP, create_app  # noqa: E402

PAGES = ["/", "/consent", "/records", "/manifest", "/actions", "/admin.css"]


def fill(tel: Any, names: list[str], props: dict[str, Any] | None = None) -> None:
    for name in names:
        tel.track(name, dict(props or {"n": 1}))
    assert tel.flush(5)


def states(tel: Any, sink: str) -> dict[str, int]:
    return dict(tel.open_outbox().counts().get(sink, {}))


# --- auth -------------------------------------------------------------------------------------


def test_without_auth_callback_everything_is_refused(admin_telemetry, client_for):
    client = client_for(admin_telemetry(), auth=None)
    for path in PAGES:
        assert client.get(path).status_code == 403, path
    assert client.get("/", headers={"accept": "application/json"}).json()["error"] == "forbidden"
    assert client.post("/actions/purge", data={"what": "all", "confirm": "yes"}).status_code == 403


def test_auth_callback_refuses_and_allows(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    refused = client_for(tel, login=False)
    for path in PAGES:
        response = refused.get(path)
        assert response.status_code == 403, path
        assert "Access refused" in response.text or path == "/admin.css"
    refused.cookies.set(kit.LOGIN_COOKIE, "a-guess")
    assert refused.get("/").status_code == 403

    allowed = client_for(tel)
    for path in PAGES:
        assert allowed.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "auth",
    [
        pytest.param(lambda request: "yes", id="truthy-but-not-True"),
        pytest.param(lambda request: 1 / 0, id="raises"),
        pytest.param(lambda request: None, id="none"),
    ],
)
def test_only_true_from_the_callback_lets_a_request_in(admin_telemetry, client_for, auth):
    assert client_for(admin_telemetry(), auth=auth).get("/").status_code == 403


def test_async_auth_callback(admin_telemetry, client_for, kit):
    async def auth(request: Any) -> bool:
        return request.cookies.get(kit.LOGIN_COOKIE) == kit.LOGIN_VALUE

    tel = admin_telemetry()
    assert client_for(tel, auth=auth).get("/").status_code == 200
    assert client_for(tel, auth=auth, login=False).get("/").status_code == 403


def test_refused_browser_is_sent_to_the_login_url(admin_telemetry, client_for):
    client = client_for(admin_telemetry(), login=False, login_url="/login?next=/admin")
    response = client.get("/records")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/admin"


# --- headers and assets -----------------------------------------------------------------------


def test_security_headers_on_every_answer(admin_telemetry, client_for):
    tel = admin_telemetry()
    allowed, refused = client_for(tel), client_for(tel, login=False)
    answers = [
        allowed.get("/"),
        allowed.get("/admin.css"),
        allowed.get("/nowhere"),
        allowed.get("/?format=json"),
        allowed.post("/consent", data={"consent": "off"}),
        refused.get("/"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 404, 200, 403, 403]
    for answer in answers:
        h = answer.headers
        assert h["content-security-policy"] == CSP
        assert h["x-frame-options"] == "DENY"
        assert h["referrer-policy"] == "no-referrer"
        assert h["x-content-type-options"] == "nosniff"
        assert h["cache-control"] == "no-store"
    assert CSP == (
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    )


def test_pages_use_no_external_assets_no_script_and_no_inline_style(admin_telemetry, client_for):
    client = client_for(admin_telemetry())
    for path in PAGES[:-1]:
        html = client.get(path).text
        assert "<script" not in html and "style=" not in html and "<style" not in html
        assert '<link rel="stylesheet" href="/admin.css">' in html
        urls = re.findall(r'(?:href|src|action)="([^"]*)"', html)
        assert urls and all(u.startswith(("/", "#")) and not u.startswith("//") for u in urls), urls
    css = client.get("/admin.css")
    assert css.headers["content-type"].startswith("text/css")
    assert "url(" not in css.text and "@import" not in css.text
    assert ":focus-visible" in css.text


def test_pages_have_landmarks_labels_and_headers(admin_telemetry, client_for):
    tel = admin_telemetry()
    fill(tel, ["signup"])
    client = client_for(tel)
    for path in PAGES[:-1]:
        html = client.get(path).text
        assert '<html lang="en">' in html
        assert '<main id="main"' in html and "<nav aria-label=" in html and "<h1>" in html
        assert 'aria-current="page"' in html
    records = client.get("/records").text
    assert '<th scope="col">Event</th>' in records and "<caption>" in records
    for field in ("f-sink", "f-state", "f-name"):
        assert f'<label for="{field}">' in records
    consent = client.get("/consent").text
    assert "<fieldset" in consent and "<legend>" in consent
    assert '<label for="consent-on">' in consent and '<label for="consent-off">' in consent


# --- CSRF -------------------------------------------------------------------------------------


def test_csrf_refuses_posts_without_or_with_a_bad_token(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    fill(tel, ["one", "two"])
    client = client_for(tel)
    before = kit.outbox_counts(tel)
    token = kit.csrf_token(client)

    attempts = [
        {"what": "all", "confirm": "yes"},
        {"what": "all", "confirm": "yes", "csrf_token": ""},
        {"what": "all", "confirm": "yes", "csrf_token": "0" * 64},
        {
            "what": "all",
            "confirm": "yes",
            "csrf_token": token[:-1] + ("0" if token[-1] != "0" else "1"),
        },
    ]
    for data in attempts:
        response = client.post("/actions/purge", data=data)
        assert response.status_code == 403, data
        assert "CSRF token" in response.text
    assert kit.outbox_counts(tel) == before

    response = client.post("/consent", data={"consent": "off"})
    assert response.status_code == 403
    assert StoredConsent.read(tel.data_dir) is None and tel.enabled


def test_csrf_token_is_bound_to_the_cookie_nonce(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    fill(tel, ["one"])
    first, second = client_for(tel), client_for(tel)
    token_of_first = kit.csrf_token(first)
    kit.csrf_token(second)  # the second session has its own nonce
    response = second.post("/actions/purge", data={"what": "all", "confirm": "yes",
                                                   "csrf_token": token_of_first})  # fmt: skip
    assert response.status_code == 403
    # Without the cookie the token is worthless too.
    first.cookies.delete("waypost_admin_csrf")
    response = first.post(
        "/actions/purge", data={"what": "all", "confirm": "yes", "csrf_token": token_of_first}
    )
    assert response.status_code == 403 and "cookie" in response.text
    assert kit.outbox_counts(tel)["jsonl"] == {"sent": 1}


def test_csrf_refuses_cross_site_and_foreign_origin(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    client = client_for(tel)
    token = kit.csrf_token(client, "/consent")
    data = {"consent": "off", "csrf_token": token}
    assert (
        client.post("/consent", data=data, headers={"sec-fetch-site": "cross-site"}).status_code
        == 403
    )
    assert (
        client.post("/consent", data=data, headers={"origin": "https://evil.example"}).status_code
        == 403
    )
    assert tel.enabled
    # A same-origin POST (Origin is "null" under Referrer-Policy: no-referrer) passes.
    response = client.post(
        "/consent", data=data, headers={"origin": "null", "sec-fetch-site": "same-origin"}
    )
    assert response.status_code == 303
    assert not tel.enabled


def test_csrf_cookie_is_httponly_samesite_strict_and_scoped(admin_telemetry, kit):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    tel = admin_telemetry()
    host = Starlette(routes=[Mount("/admin/telemetry", app=create_app(tel, auth=kit.allow_login))])
    with TestClient(host, follow_redirects=False) as client:
        client.cookies.set(kit.LOGIN_COOKIE, kit.LOGIN_VALUE)
        response = client.get("/admin/telemetry/actions")
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("waypost_admin_csrf=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/admin/telemetry" in cookie
        # A second page reuses the nonce: no new cookie.
        assert "set-cookie" not in client.get("/admin/telemetry/consent").headers


def test_csrf_key_is_shared_through_the_data_dir(admin_telemetry, kit):
    from starlette.testclient import TestClient

    tel = admin_telemetry()
    # Two apps over one data dir stand for two worker processes of the host.
    one = TestClient(create_app(tel, auth=kit.allow_login), follow_redirects=False)
    two = TestClient(create_app(tel, auth=kit.allow_login), follow_redirects=False)
    one.cookies.set(kit.LOGIN_COOKIE, kit.LOGIN_VALUE)
    token = kit.csrf_token(one, "/consent")
    two.cookies.set(kit.LOGIN_COOKIE, kit.LOGIN_VALUE)
    two.cookies.set("waypost_admin_csrf", one.cookies.get("waypost_admin_csrf"))
    assert two.post("/consent", data={"consent": "off", "csrf_token": token}).status_code == 303
    assert (Path(tel.data_dir) / "admin-csrf.key").stat().st_mode & 0o777 == 0o600


def test_csrf_token_in_a_header_for_json_clients(admin_telemetry, client_for):
    tel = admin_telemetry()
    client = client_for(tel)
    token = client.get("/consent?format=json").json()["csrf_token"]
    response = client.post(
        "/consent",
        data={"consent": "off"},
        headers={"x-csrf-token": token, "accept": "application/json"},
    )
    assert response.status_code == 200
    assert response.json()["enabled"] is False and response.json()["rule"] == "admin"


# --- escaping and secrets ---------------------------------------------------------------------

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_hostile_event_name_and_properties_are_escaped(admin_telemetry, client_for):
    tel = admin_telemetry()
    fill(tel, [HOSTILE], {HOSTILE: HOSTILE, "note": "</pre><b>bold</b>"})
    client = client_for(tel)
    for path in ["/records", f"/records?name={HOSTILE}"]:
        html = client.get(path).text
        assert "<script>" not in html and "<img" not in html and "<b>" not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
        assert "&lt;/pre&gt;&lt;b&gt;bold&lt;/b&gt;" in html
    data = client.get("/records?format=json").json()
    assert {r["name"] for r in data["records"]} == {HOSTILE}
    # The filter value is reflected escaped, inside the attribute.
    html = client.get('/records?name="><script>x</script>').text
    assert 'value="&#34;&gt;&lt;script&gt;x&lt;/script&gt;"' in html


def test_hostile_manifest_description_is_escaped(admin_telemetry, client_for):
    class HostileAdminPayload(waypost.Payload, event="admin_test_hostile"):
        """<script>doc()</script>"""

        field_one: int = Field(serialization_alias="<b>fieldOne</b>", description=HOSTILE)

    html = client_for(admin_telemetry()).get("/manifest").text
    assert "<script>" not in html and "<img" not in html and "<b>fieldOne" not in html
    assert "&lt;b&gt;fieldOne&lt;/b&gt;" in html and "&lt;script&gt;doc()&lt;/script&gt;" in html


def test_secrets_of_sink_configs_are_never_rendered(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    client = client_for(tel)
    html = client.get("/").text
    raw_json = client.get("/?format=json").text
    for text in (html, raw_json):
        assert kit.API_KEY not in text
        assert kit.HEADER_TOKEN not in text and "HEADERSECRET" not in text
        assert kit.HOST_PASSWORD not in text
    sinks = {s["name"]: s for s in json.loads(raw_json)["sinks"]}
    config = sinks["gate"]["config"]
    assert config["api_key"] == "[secret: set]"
    assert config["headers"] == {"Authorization": "[hidden]"}
    assert config["region"] == "eu"  # harmless settings stay visible
    assert config["host"] == "https://[hidden]@collector.example.invalid/ingest"
    assert sinks["jsonl"]["config"]["path"].endswith("events.jsonl")
    assert "[secret: set]" in html and "Authorization" in html


# --- status -----------------------------------------------------------------------------------


def test_status_page_shows_rule_mode_level_sinks_and_counts(admin_telemetry, client_for):
    tel = admin_telemetry(config={"level": "all"})
    fill(tel, ["a", "b", "c"])
    client = client_for(tel)
    data = client.get("/", headers={"accept": "application/json"}).json()
    assert data["enabled"] is True and data["rule"] == "default" and data["level"] == "all"
    assert data["mode"] == "opt-out"
    assert data["outbox_pending_events"] == 3  # waiting for the gate
    sinks = {s["name"]: s for s in data["sinks"]}
    assert sinks["jsonl"]["delivered"] == 3 and sinks["jsonl"]["last_success"]
    assert sinks["gate"]["pending"] == 3 and "503" in sinks["gate"]["last_error"]
    html = client.get("/").text
    assert "Telemetry is <strong>on</strong>" in html
    assert "<code>default</code>" in html and "destination is down (503)" in html
    assert '<th scope="row">Events pending in the outbox</th><td>3</td>' in html


# --- consent ----------------------------------------------------------------------------------


def post_consent(client: Any, kit: Any, value: str) -> Any:
    return client.post(
        "/consent", data={"consent": value, "csrf_token": kit.csrf_token(client, "/consent")}
    )


def test_consent_flip_stores_the_admin_choice(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    client = client_for(tel)
    assert client.get("/consent?format=json").json()["stored"] is None

    response = post_consent(client, kit, "off")
    assert response.status_code == 303
    assert response.headers["location"] == "/consent?done=consent_off"
    assert StoredConsent.read(tel.data_dir).enabled is False
    assert not tel.enabled and tel.decision.rule == "admin"
    page = client.get(response.headers["location"]).text
    assert "Telemetry is now off" in page and "Telemetry is <strong>off</strong>" in page
    # Off means off: nothing new reaches the outbox.
    before = tel.open_outbox().counts()
    tel.track("after_off")
    tel.flush(2)
    assert tel.open_outbox().counts() == before

    response = post_consent(client, kit, "on")
    assert response.status_code == 303
    assert StoredConsent.read(tel.data_dir).enabled is True and tel.enabled
    data = client.get("/consent?format=json").json()
    assert data["stored"]["enabled"] is True and data["rule"] == "admin" and data["can_change"]


def test_bad_consent_value_is_refused(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    client = client_for(tel)
    token = kit.csrf_token(client, "/consent")
    assert (
        client.post("/consent", data={"consent": "maybe", "csrf_token": token}).status_code == 400
    )
    assert StoredConsent.read(tel.data_dir) is None


@pytest.mark.parametrize(
    ("config", "env", "rule", "hint"),
    [
        ({"enabled": True}, {}, "config", "Remove telemetry.enabled"),
        ({"enabled": False}, {}, "config", "Remove telemetry.enabled"),
        ({}, {"DO_NOT_TRACK": "1"}, "do_not_track", "Unset DO_NOT_TRACK"),
        ({"disable_env": "MYAPP_NO_TELEMETRY"}, {"MYAPP_NO_TELEMETRY": "true"}, "app_env",
         "Unset MYAPP_NO_TELEMETRY"),
        ({"mode": "opt-in", "enable_env": "SEND_TELEMETRY"}, {"SEND_TELEMETRY": "true"}, "app_env",
         "Unset SEND_TELEMETRY"),
    ],
)  # fmt: skip
def test_consent_switch_is_disabled_when_config_or_env_decides(
    admin_telemetry, client_for, kit, clean_env, config, env, rule, hint
):
    tel = admin_telemetry(config=config, env={**clean_env, **env})
    enabled_before = tel.enabled
    client = client_for(tel)
    html = client.get("/consent").text
    assert "<fieldset disabled" in html and 'aria-describedby="override"' in html
    assert "This switch is disabled" in html and hint in html
    data = client.get("/consent?format=json").json()
    assert data["overridden"] is True and data["can_change"] is False and data["rule"] == rule

    token = kit.csrf_token(client, "/consent")
    for value in ("on", "off"):
        response = client.post("/consent", data={"consent": value, "csrf_token": token})
        assert response.status_code == 409
        assert "The choice was not changed" in response.text and hint in response.text
    json_answer = client.post(
        "/consent", data={"consent": "off", "csrf_token": token},
        headers={"accept": "application/json"},
    )  # fmt: skip
    assert (
        json_answer.status_code == 409
        and "overrides the stored choice" in json_answer.json()["error"]
    )
    assert StoredConsent.read(tel.data_dir) is None
    assert tel.enabled == enabled_before and tel.decision.rule == rule


# --- records ----------------------------------------------------------------------------------


def test_records_filters_and_paging(admin_telemetry, client_for):
    tel = admin_telemetry()
    fill(tel, ["signup"] * 3 + ["login"] * 2)
    client = client_for(tel)

    def get(query: str) -> dict[str, Any]:
        response = client.get(f"/records?format=json&{query}")
        assert response.status_code == 200
        return response.json()

    everything = get("")
    assert everything["total"] == 10  # 5 events x 2 sinks
    assert get("sink=jsonl")["total"] == 5
    assert {r["state"] for r in get("sink=jsonl")["records"]} == {"sent"}
    assert get("sink=gate&state=pending")["total"] == 5
    assert get("sink=gate&state=sent")["total"] == 0
    assert get("state=sent&name=login")["total"] == 2
    assert get("name=nothing")["records"] == []

    first = get("name=signup&per_page=2")
    assert (first["total"], first["pages"], len(first["records"])) == (6, 3, 2)
    last = get("name=signup&per_page=2&page=3")
    assert len(last["records"]) == 2
    seqs = [r["seq"] for p in (1, 2, 3) for r in get(f"name=signup&per_page=2&page={p}")["records"]]
    assert len(set(seqs)) == 6 and seqs == sorted(seqs, reverse=True)

    html = client.get("/records?name=signup&per_page=2&page=2").text
    assert (
        'rel="prev" href="/records?sink=&amp;state=&amp;name=signup&amp;per_page=2&amp;page=1"'
        in html
    )
    assert 'rel="next"' in html and "page 2 of 3" in html
    assert client.get("/records?state=bogus").status_code == 400


def test_records_show_redaction_remarks_and_are_read_only(admin_telemetry, client_for):
    tel = admin_telemetry()
    fill(tel, ["contact"], {"owner": "mail me at ada@example.com", "path": "/home/ada/x"})
    client = client_for(tel)
    record = client.get("/records?format=json&sink=jsonl").json()["records"][0]
    assert record["remarks"] == ["email@properties.owner", "home_path@properties.path"]
    assert "ada@example.com" not in json.dumps(record)
    html = client.get("/records").text
    assert "<code>email@properties.owner</code>" in html
    assert 'method="post"' not in html
    assert client.post("/records").status_code == 405


def test_records_page_does_not_create_an_outbox(admin_telemetry, client_for, clean_env):
    tel = admin_telemetry(config={"enabled": False})
    client = client_for(tel)
    assert client.get("/records?format=json").json()["total"] == 0
    assert not (Path(tel.data_dir) / "outbox.sqlite3").exists()


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_lists_declared_fields_by_wire_name(admin_telemetry, client_for):
    class AdminRunPayload(waypost.Payload, event="admin_test_run", level="usage"):
        """A flow run finished."""

        run_seconds: int = Field(serialization_alias="runSeconds", description="How long it ran.")
        run_success: bool = Field(serialization_alias="runSuccess")

    client = client_for(admin_telemetry())
    data = client.get("/manifest?format=json").json()
    entry = next(e for e in data["events"] if e["event"] == "admin_test_run")
    assert entry["description"] == "A flow run finished."
    assert [(f["name"], f["type"], f["description"]) for f in entry["fields"]] == [
        ("runSeconds", "int", "How long it ran."),
        ("runSuccess", "bool", ""),
    ]
    assert {e["name"] for e in data["envelope"]} >= {"id", "instance_id", "context.python"}
    html = client.get("/manifest").text
    assert "<code>admin_test_run</code>" in html and "<code>runSeconds</code>" in html


# --- actions ----------------------------------------------------------------------------------


# No retry falls due by itself in these tests: what Submit now delivers is all it delivers.
SLOW_RETRY = {"retry": {"initial": 600, "maximum": 600, "breaker_threshold": 100000}}


def test_submit_now_delivers_what_is_pending(admin_telemetry, client_for, kit, gate):
    tel = admin_telemetry(config=SLOW_RETRY)
    fill(tel, ["a", "b", "c"])
    client = client_for(tel)
    assert states(tel, "gate") == {"pending": 3}

    response = client.post("/actions/flush", data={"csrf_token": kit.csrf_token(client)})
    assert response.status_code == 303
    assert response.headers["location"] == "/actions?done=flush_partial&n=3&d=0"
    assert states(tel, "gate") == {"pending": 3}
    page = client.get(response.headers["location"]).text
    assert "0 event(s) delivered, but 3 event(s) are still pending" in page
    assert "Why events are still pending" in page  # the gate sink, with its state

    gate.set()
    response = client.post("/actions/flush", data={"csrf_token": kit.csrf_token(client)})
    assert response.headers["location"] == "/actions?done=flushed&n=0&d=3"
    assert states(tel, "gate") == {"sent": 3} and states(tel, "jsonl") == {"sent": 3}
    page = client.get("/actions?format=json").json()
    assert page["outbox"] == {"total": 6, "pending": 0, "sent": 6, "failed": 0}


def test_submit_now_is_refused_when_telemetry_is_off(admin_telemetry, client_for, kit):
    tel = admin_telemetry(config={"enabled": False})
    client = client_for(tel)
    assert (
        '<button type="submit" aria-describedby="submit-help" disabled>'
        in client.get("/actions").text
    )
    response = client.post("/actions/flush", data={"csrf_token": kit.csrf_token(client)})
    assert response.status_code == 409 and "telemetry is off" in response.text


def test_delete_submitted_keeps_pending(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    fill(tel, ["a", "b"])
    client = client_for(tel)
    assert states(tel, "jsonl") == {"sent": 2} and states(tel, "gate") == {"pending": 2}
    response = client.post(
        "/actions/purge", data={"what": "sent", "csrf_token": kit.csrf_token(client)}
    )
    assert response.headers["location"] == "/actions?done=purged_sent&n=2"
    assert states(tel, "jsonl") == {} and states(tel, "gate") == {"pending": 2}
    assert "Deleted 2 submitted record(s)." in client.get(response.headers["location"]).text


def test_delete_all_needs_confirmation_then_empties_the_outbox(admin_telemetry, client_for, kit):
    tel = admin_telemetry()
    fill(tel, ["a", "b"])
    client = client_for(tel)
    token = kit.csrf_token(client)
    response = client.post("/actions/purge", data={"what": "all", "csrf_token": token})
    assert response.status_code == 400
    assert sum(sum(s.values()) for s in tel.open_outbox().counts().values()) == 4

    response = client.post(
        "/actions/purge", data={"what": "all", "confirm": "yes", "csrf_token": token}
    )
    assert response.headers["location"] == "/actions?done=purged_all&n=4"
    assert tel.open_outbox().counts() == {}
    assert client.post("/actions/purge", data={"what": "x", "csrf_token": token}).status_code == 400


def test_actions_answer_json(admin_telemetry, client_for, gate):
    tel = admin_telemetry(config=SLOW_RETRY)
    fill(tel, ["a"])
    gate.set()
    client = client_for(tel)
    token = client.get("/actions?format=json").json()["csrf_token"]
    headers = {"accept": "application/json", "x-csrf-token": token}
    assert client.post("/actions/flush", headers=headers).json() == {
        "ok": True,
        "done": "flushed",
        "n": 0,
        "d": 1,
        "pending": {},
    }
    assert client.post("/actions/purge", data={"what": "sent"}, headers=headers).json()["n"] == 2
    assert tel.open_outbox().counts() == {}
    gate.clear()  # a destination down: the answer says what is still pending, and is not ok
    fill(tel, ["b"])
    partial = client.post("/actions/flush", headers=headers).json()
    assert partial["ok"] is False and partial["done"] == "flush_partial"
    assert partial["n"] == 1 and partial["d"] == 0  # the jsonl sink took it before, the gate not
    assert partial["pending"]["gate"]["pending"] == 1 and partial["pending"]["gate"]["state"]


# --- prefix and mounting ----------------------------------------------------------------------


def test_prefix_and_starlette_mount_build_links_under_the_mount(admin_telemetry, kit):
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    tel = admin_telemetry()
    inner = create_app(tel, auth=kit.allow_login, prefix="/telemetry/")
    host = Starlette(routes=[Mount("/admin", app=inner)])
    with TestClient(host, follow_redirects=False) as client:
        client.cookies.set(kit.LOGIN_COOKIE, kit.LOGIN_VALUE)
        html = client.get("/admin/telemetry/").text
        assert 'href="/admin/telemetry/admin.css"' in html
        assert 'action="/admin/telemetry/records"' in client.get("/admin/telemetry/records").text
        assert client.get("/admin/telemetry").headers["location"].endswith("/admin/telemetry/")
        token = kit.csrf_token(client, "/admin/telemetry/consent")
        response = client.post(
            "/admin/telemetry/consent", data={"consent": "off", "csrf_token": token}
        )
        assert response.headers["location"] == "/admin/telemetry/consent?done=consent_off"
        assert not tel.enabled
