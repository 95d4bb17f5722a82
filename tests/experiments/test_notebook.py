"""`hesskit.experiments.notebook`: fast mode, and `claim` (the notebooks' conclusions are computed and
printed, and enforced only in a claims run)."""

from __future__ import annotations

import pytest

from hesskit.experiments import CLAIMS, budget, claim, claims_mode, fast_mode


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("HESSKIT_CLAIMS", raising=False)
    monkeypatch.delenv("HESSKIT_FAST", raising=False)
    return monkeypatch


def test_claim_prints_the_verdict_and_records_it(env, capsys):
    before = len(CLAIMS)
    claim(2 > 1, "two beats one")
    claim(1 > 2, "one beats two")  # normal run: only printed
    assert CLAIMS[-2:] == [("two beats one", True), ("one beats two", False)]
    out = capsys.readouterr().out
    assert "✓ claim: two beats one" in out and "✗ claim failed: one beats two" in out
    assert CLAIMS[before:] == [("two beats one", True), ("one beats two", False)]


def test_a_failed_claim_fails_a_claims_run(env):
    env.setenv("HESSKIT_CLAIMS", "1")
    assert claims_mode()
    claim(True, "holds")
    assert CLAIMS[-1] == ("holds", True)
    with pytest.raises(AssertionError, match="claim failed: does not hold"):
        claim(False, "does not hold")


def test_fast_mode_never_enforces_claims(env, capsys):
    env.setenv("HESSKIT_CLAIMS", "1")
    env.setenv("HESSKIT_FAST", "1")
    assert not claims_mode()
    claim(False, "needs the full budget")
    assert CLAIMS[-1] == ("needs the full budget", False)
    assert "(fast mode: not checked)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["", "0"])
def test_claims_off_unless_set(env, value):
    env.setenv("HESSKIT_CLAIMS", value)
    assert not claims_mode()
    claim(False, "off")
    assert CLAIMS[-1] == ("off", False)


def test_fast_mode_and_budget(monkeypatch):
    monkeypatch.setenv("HESSKIT_FAST", "1")
    assert fast_mode() and budget(100, 3) == 3
    monkeypatch.setenv("HESSKIT_FAST", "0")
    assert not fast_mode() and budget(100, 3) == 100
