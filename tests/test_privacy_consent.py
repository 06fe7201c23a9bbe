"""Consent: the fixed precedence, through ``Telemetry(env=...)`` and ``status()``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from waypost.config import TelemetryConfig
from waypost.privacy import StoredConsent, parse_bool, resolve_consent

Factory = Callable[..., Any]

FLOWISE = {"disable_env": "DISABLE_FLOWISE_TELEMETRY"}  # opt-out variable
FIREFLY = {"mode": "opt-in", "enable_env": "SEND_TELEMETRY"}  # opt-in variable


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 "])
def test_do_not_track_true_values(value: str) -> None:
    assert parse_bool(value) is True


@pytest.mark.parametrize("value", ["y", "t", "2", "enable", "", "  "])
def test_other_values_are_not_booleans(value: str) -> None:
    assert parse_bool(value) is None


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "OFF"])
def test_false_values(value: str) -> None:
    assert parse_bool(value) is False


def status(tel: Any) -> tuple[bool, str, str]:
    s = tel.status()
    return s.enabled, s.rule, s.reason


def test_default_opt_out_is_on(make_telemetry: Factory) -> None:
    enabled, rule, reason = status(make_telemetry(start=False))
    assert (enabled, rule) == (True, "default")
    assert reason == "the application is opt-out and nobody opted out"


def test_default_opt_in_is_off(make_telemetry: Factory) -> None:
    enabled, rule, reason = status(make_telemetry(config={"mode": "opt-in"}))
    assert (enabled, rule) == (False, "default")
    assert "opt-in" in reason


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "ON"])
def test_do_not_track_wins_over_everything(
    make_telemetry: Factory, clean_env: dict[str, str], value: str
) -> None:
    env = {**clean_env, "DO_NOT_TRACK": value, "SEND_TELEMETRY": "true"}
    tel = make_telemetry(env=env, config={**FIREFLY, "enabled": True})
    enabled, rule, reason = status(tel)
    assert (enabled, rule) == (False, "do_not_track")
    assert reason == f"DO_NOT_TRACK={value} in the environment turns telemetry off"
    assert not tel.enabled


@pytest.mark.parametrize("value", ["0", "false", "", "maybe"])
def test_do_not_track_other_values_do_not_decide(
    make_telemetry: Factory, clean_env: dict[str, str], value: str
) -> None:
    tel = make_telemetry(env={**clean_env, "DO_NOT_TRACK": value}, start=False)
    assert status(tel)[:2] == (True, "default")


def test_app_opt_out_variable(make_telemetry: Factory, clean_env: dict[str, str]) -> None:
    env = {**clean_env, "DISABLE_FLOWISE_TELEMETRY": "true"}
    tel = make_telemetry(env=env, config={**FLOWISE, "enabled": True})
    enabled, rule, reason = status(tel)
    assert (enabled, rule) == (False, "app_env")
    assert reason == "DISABLE_FLOWISE_TELEMETRY=true in the environment turns telemetry off"
    # false does not decide: it never turns on what the config file turned off
    env = {**clean_env, "DISABLE_FLOWISE_TELEMETRY": "false"}
    tel = make_telemetry(env=env, config={**FLOWISE, "enabled": False}, start=False)
    assert status(tel)[:2] == (False, "config")


def test_app_opt_in_variable(make_telemetry: Factory, clean_env: dict[str, str]) -> None:
    tel = make_telemetry(env={**clean_env, "SEND_TELEMETRY": "true"}, config=FIREFLY, start=False)
    enabled, rule, reason = status(tel)
    assert (enabled, rule) == (True, "app_env")
    assert reason == "SEND_TELEMETRY=true in the environment turns telemetry on"
    tel = make_telemetry(env={**clean_env, "SEND_TELEMETRY": "no"}, config=FIREFLY)
    assert status(tel)[:2] == (False, "app_env")


def test_unrecognised_app_variable_is_ignored(
    make_telemetry: Factory, clean_env: dict[str, str]
) -> None:
    env = {**clean_env, "DISABLE_FLOWISE_TELEMETRY": "sometimes"}
    tel = make_telemetry(env=env, config=FLOWISE, start=False)
    assert status(tel)[:2] == (True, "default")


def test_config_file_wins_over_the_admin_choice(make_telemetry: Factory, tmp_path: Path) -> None:
    # FlowForge: telemetry.enabled in the config file overrides what the admin stored.
    data = tmp_path / "shared"
    make_telemetry(data_dir=data, start=False).set_consent(False)
    tel = make_telemetry(data_dir=data, config={"enabled": True}, start=False)
    enabled, rule, reason = status(tel)
    assert (enabled, rule) == (True, "config")
    assert reason == "telemetry.enabled is true in <config>"
    tel = make_telemetry(data_dir=data, config={"enabled": False})
    assert status(tel)[:2] == (False, "config")


def test_admin_choice_is_stored_and_applied(make_telemetry: Factory, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    tel = make_telemetry(data_dir=data, start=False)
    decision = tel.set_consent(False)
    assert (decision.enabled, decision.rule) == (False, "admin")
    assert not tel.enabled
    stored = StoredConsent.read(data)
    assert stored is not None and (stored.enabled, stored.policy_version) == (False, "1")
    again = make_telemetry(data_dir=data)
    assert status(again) == (False, "admin", "the administrator turned telemetry off")
    # Turned on again: the application's instance starts at once (an inspecting instance,
    # made with start=False as the CLI does, only stores the choice).
    decision = again.set_consent(True)
    assert (decision.enabled, decision.rule) == (True, "admin")
    assert again.enabled


def test_set_consent_does_not_beat_a_higher_rule(
    make_telemetry: Factory, clean_env: dict[str, str]
) -> None:
    tel = make_telemetry(env={**clean_env, "DO_NOT_TRACK": "1"})
    decision = tel.set_consent(True)
    assert (decision.enabled, decision.rule) == (False, "do_not_track")
    assert not tel.enabled


def test_opt_in_asks_again_on_a_new_policy_version(make_telemetry: Factory, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    tel = make_telemetry(data_dir=data, config={"mode": "opt-in", "policy_version": "2024-01"})
    assert tel.set_consent(True).rule == "admin"
    stored = StoredConsent.read(data)
    assert stored is not None and stored.policy_version == "2024-01"
    same = make_telemetry(
        data_dir=data, config={"mode": "opt-in", "policy_version": "2024-01"}, start=False
    )
    assert status(same)[:2] == (True, "admin")
    newer = make_telemetry(data_dir=data, config={"mode": "opt-in", "policy_version": "2025-01"})
    enabled, rule, reason = status(newer)
    assert (enabled, rule) == (False, "default")
    assert "2024-01" in reason and "2025-01" in reason and "asks again" in reason


def test_opt_out_keeps_a_refusal_across_policy_versions(
    make_telemetry: Factory, tmp_path: Path
) -> None:
    data = tmp_path / "shared"
    make_telemetry(data_dir=data, config={"policy_version": "1"}, start=False).set_consent(False)
    tel = make_telemetry(data_dir=data, config={"policy_version": "2"}, start=False)
    assert status(tel)[:2] == (False, "admin")


def test_resolve_consent_order_of_rules() -> None:
    """The whole ladder in one place, each rung removed in turn."""
    config = TelemetryConfig(mode="opt-in", enable_env="SEND_TELEMETRY", enabled=False)
    stored = StoredConsent(True, "1", 0.0)
    env = {"DO_NOT_TRACK": "yes", "SEND_TELEMETRY": "1"}
    assert resolve_consent(config, env, stored).rule == "do_not_track"
    assert resolve_consent(config, {"SEND_TELEMETRY": "1"}, stored).rule == "app_env"
    assert resolve_consent(config, {}, stored).rule == "config"
    unset = config.model_copy(update={"enabled": None})
    assert resolve_consent(unset, {}, stored).rule == "admin"
    assert resolve_consent(unset, {}, None).rule == "default"
