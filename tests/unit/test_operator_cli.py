"""The operator's command-line options and environment settings."""

from __future__ import annotations

import pytest
from openchecker_operator.__main__ import load_settings


def test_namespaces_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENCHECKER_OPERATOR_ALL_NAMESPACES", raising=False)

    settings = load_settings(["--namespace", "a", "-n", "b", "--standalone"])

    assert settings.namespaces == ("a", "b")
    assert not settings.all_namespaces
    assert settings.standalone


def test_environment_sets_resync_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCHECKER_OPERATOR_RESYNC_INTERVAL_SECONDS", "2.5")

    settings = load_settings(["--all-namespaces"])

    assert settings.resync_interval_seconds == 2.5
    assert settings.all_namespaces
    assert settings.namespaces == ()


def test_liveness_option(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(["-A", "--liveness", "http://127.0.0.1:8080/healthz"])

    assert settings.liveness_endpoint == "http://127.0.0.1:8080/healthz"


def test_scope_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings([])

    assert caught.value.code == 2
    assert "--namespace (repeatable) or --all-namespaces" in capsys.readouterr().err


def test_invalid_environment_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENCHECKER_OPERATOR_RESYNC_INTERVAL_SECONDS", "-1")

    with pytest.raises(SystemExit):
        load_settings(["-A"])

    assert "resync_interval_seconds" in capsys.readouterr().err
