"""Start-up's failures told apart: a config the operator must mend, a fault in waypost's own
code (reported as such, never as the operator's config error)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import waypost
from waypost.config import loading


def _broken_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault inside the loader itself, as a bug in waypost would raise it."""

    def env_overrides(env: object) -> dict[str, object]:
        raise AttributeError("'NoneType' object has no attribute 'items'")

    monkeypatch.setattr(loading, "env_overrides", env_overrides)


def test_a_fault_in_the_loader_is_not_reported_as_the_operators_config_error(
    tmp_path: Path,
    waypost_clean_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tmp_path / "telemetry.yml"
    config.write_text("telemetry:\n  notice: {enabled: false}\n  sinks: {log: {}}\n")
    _broken_loader(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="waypost"):
        tel = waypost.Telemetry(
            app="faulty", config=str(config), env=waypost_clean_env, data_dir=tmp_path / "d"
        )
    st = tel.status()
    assert st.config_error is None  # the file is fine: nothing for the operator to mend
    assert (st.enabled, st.running, st.rule) == (False, False, "error")
    assert "AttributeError" in st.reason and "fault in waypost" in st.reason
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # one line, with the traceback
    assert tel.set_consent(True).rule == "error" and not tel.enabled  # consent cannot start it
    tel.track("ignored", {})
    assert tel.flush(1) and tel.shutdown(1)


def test_strict_mode_raises_the_loaders_fault_itself(
    tmp_path: Path, waypost_clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "telemetry.yml"
    config.write_text("telemetry:\n  sinks: {log: {}}\n")
    _broken_loader(monkeypatch)
    with pytest.raises(AttributeError, match="no attribute 'items'"):
        waypost.Telemetry(
            app="faulty", config=str(config), env=waypost_clean_env, data_dir=tmp_path / "d",
            strict=True,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("telemetry:\n  level: loud\n", "level"),  # an invalid value
        ("telemetry: [unclosed\n", "invalid YAML"),  # a file that does not parse
    ],
)
def test_a_bad_config_is_still_the_operators_config_error(
    tmp_path: Path, waypost_clean_env: dict[str, str], text: str, reason: str
) -> None:
    config = tmp_path / "telemetry.yml"
    config.write_text(text)
    tel = waypost.Telemetry(
        app="bad", config=str(config), env=waypost_clean_env, data_dir=tmp_path / "d"
    )
    st = tel.status()
    assert st.rule == "config_error" and st.config_error and reason in st.config_error
    with pytest.raises(waypost.ConfigError, match=reason):
        waypost.Telemetry(
            app="bad", config=str(config), env=waypost_clean_env, data_dir=tmp_path / "d",
            strict=True,
        )  # fmt: skip
