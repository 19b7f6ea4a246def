"""bench.env_pair: the environment specs, the children's environments and the A B B A order."""
from __future__ import annotations

import argparse

import pytest

from bench.env_pair import child_env, pair_order, parse_env


def test_env_specs_parse_and_reject_what_is_not_key_value() -> None:
    assert parse_env("OMP_WAIT_POLICY=ACTIVE,GOMP_SPINCOUNT=10000") == {"OMP_WAIT_POLICY": "ACTIVE",
                                                                       "GOMP_SPINCOUNT": "10000"}
    assert parse_env("A=") == {"A": ""}
    for bad in ("A", "=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_env(bad)


def test_a_child_gets_the_overrides_and_loses_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEP", "1")
    monkeypatch.setenv("DROP", "1")
    env = child_env({"DROP": "", "NEW": "x"})
    assert env["KEEP"] == "1" and env["NEW"] == "x" and "DROP" not in env


def test_each_side_goes_first_as_often_as_the_other() -> None:
    assert pair_order(2) == ["a", "b", "b", "a"]
    assert pair_order(3).count("a") == pair_order(3).count("b") == 3
