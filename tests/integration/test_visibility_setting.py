"""DIP_VISIBILITY_DELAY_MINUTES: resolved once, parameter > environment > default, and a
bad value is one line naming the variable (the same as every other setting)."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncpoint import settings
from syncpoint.core.errors import ConfigError


@pytest.fixture(autouse=True)
def _dip_configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIP_API_URL", "http://127.0.0.1:9/")
    monkeypatch.delenv("DIP_VISIBILITY_DELAY_MINUTES", raising=False)


def test_default_then_environment_then_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings.resolve_document_sync().visibility_delay_minutes == 15

    monkeypatch.setenv("DIP_VISIBILITY_DELAY_MINUTES", "40")
    assert settings.resolve_document_sync().visibility_delay_minutes == 40

    given = settings.resolve_document_sync(visibility_delay_minutes=0)
    assert given.visibility_delay_minutes == 0  # 0 is a value: no overlap, as asked


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("DIP_VISIBILITY_DELAY_MINUTES", value)

    with pytest.raises(ConfigError, match="DIP_VISIBILITY_DELAY_MINUTES"):
        settings.resolve_document_sync()


@pytest.mark.parametrize("value", [-5.0, float("nan")])
def test_a_bad_parameter_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="visibility_delay_minutes"):
        settings.resolve_document_sync(visibility_delay_minutes=value)
