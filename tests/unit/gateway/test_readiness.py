"""/readyz answers anyone: a failed check says which, in a fixed sentence, never the exception's text."""

from __future__ import annotations

import logging

from services.gateway.routes.health import NotReady, _timed


def test_a_failing_backend_is_named_without_its_error_text(caplog) -> None:
    def database() -> None:
        raise OSError('connection to server at "db.internal" (10.0.0.7), port 5432 failed: user "xrayq_admin"')

    with caplog.at_level(logging.WARNING):
        result = _timed("database", database)
    assert result["ok"] is False and result["error"] == "the database did not answer"
    assert "10.0.0.7" not in str(result) and "xrayq_admin" not in str(result)
    assert "xrayq_admin" in caplog.text  # the operator still finds it in the gateway's log


def test_our_own_reasons_are_shown() -> None:
    def model() -> None:
        raise NotReady("no active version of 'chest-xray'")

    assert _timed("model", model)["error"] == "no active version of 'chest-xray'"
    assert _timed("storage", lambda: None)["ok"] is True
