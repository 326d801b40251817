"""Text that leaves the process: secrets masked by value, upstream text made printable."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from syncpoint.core.db import Database
from syncpoint.core.redact import RedactingFilter, printable, redact, register_secret

# The registry is process-wide and has no "forget": every test uses values of its own.


def test_a_registered_value_is_masked_in_any_words() -> None:
    register_secret("sekrit123")
    assert redact("Invalid key sekrit123 for this plan") == "Invalid key *** for this plan"
    assert redact("x-sekrit123-sekrit123.") == "x-***-***."


def test_pattern_masking_still_applies() -> None:
    assert redact("GET /x?symbol=A&apikey=abc") == "GET /x?symbol=A&apikey=***"
    assert redact("postgresql://u:pw@db/x") == "postgresql://u:***@db/x"


def test_short_values_are_not_registered() -> None:
    register_secret("abcde")  # five characters: masking it would shred ordinary words
    register_secret("")
    register_secret(None)
    assert redact("abcde abcdef") == "abcde abcdef"


def test_a_secretstr_and_the_url_encoded_spellings_are_masked() -> None:
    register_secret(SecretStr("k+y/with=chars"))
    assert redact("raw k+y/with=chars") == "raw ***"
    assert redact("path k%2By%2Fwith%3Dchars") == "path ***"
    assert redact("form k%2By%2Fwith%3Dchars") == "form ***"


def test_a_secret_that_contains_another_is_masked_whole() -> None:
    register_secret("inner-secret")
    register_secret("outer-inner-secret-tail")
    assert redact("said outer-inner-secret-tail") == "said ***"


def test_the_log_filter_masks_registered_values(caplog: pytest.LogCaptureFixture) -> None:
    register_secret("log-secret-value")
    logger = logging.getLogger("test_redact.filter")
    logger.addFilter(RedactingFilter())
    caplog.set_level(logging.INFO, logger="test_redact.filter")
    logger.info("upstream said %s", "no such key log-secret-value here")
    assert "log-secret-value" not in caplog.text
    assert "no such key *** here" in caplog.text


def test_a_database_password_and_secret_connect_args_are_registered() -> None:
    Database.from_url(
        "postgresql://sync:pg-pass-4242@db.example/market",
        {"sslpassword": "tls-pass-9898", "sslmode": "verify-full", "application_name": "sp"},
    )
    # A driver can quote the password without any "password=" in front of it.
    assert redact("auth failed: pg-pass-4242") == "auth failed: ***"
    assert redact("bad pass tls-pass-9898") == "bad pass ***"
    assert redact("sslmode verify-full") == "sslmode verify-full"  # not a secret


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param("plain text", "plain text", id="plain"),
        pytest.param("Müller: 東京 ✓", "Müller: 東京 ✓", id="unicode-kept"),
        pytest.param("\x1b[2J\x1b[31mred", r"\x1b[2J\x1b[31mred", id="ansi-escape"),
        pytest.param("a\x00b\x7fc", r"a\x00b\x7fc", id="nul-del"),
        pytest.param("line\r\nnext\ttab", r"line\x0d\x0anext\x09tab", id="newlines-tabs"),
        pytest.param("csi\x9b31m", r"csi\x9b31m", id="c1-csi"),
        pytest.param("abc\u202eevil", r"abc\u202eevil", id="bidi-override"),
        pytest.param("\u2066iso\u2069", r"\u2066iso\u2069", id="bidi-isolate"),
        pytest.param("a\u2028b\ufeff", r"a\u2028b\ufeff", id="line-separator-bom"),
    ],
)
def test_printable_escapes_control_characters(text: str, shown: str) -> None:
    assert printable(text, 200) == shown


def test_printable_caps_length_without_splitting_an_escape() -> None:
    assert printable("x" * 300, 20) == "x" * 17 + "..."
    assert printable("x" * 20, 20) == "x" * 20
    # Four escapes of four characters fit in 17; the fifth would be cut, so it is dropped.
    assert printable("\x1b" * 30, 20) == r"\x1b" * 4 + "..."
    assert len(printable("y\x1b" * 1000, 50)) <= 50


def test_printable_refuses_a_useless_limit() -> None:
    with pytest.raises(ValueError, match="too small"):
        printable("abc", 3)
