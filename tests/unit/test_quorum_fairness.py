"""Quorum membership with a minimum wait (shared.rounds.quorum_members) and the fairness model of
`fedmask bench quorum` (ops/bench/quorum_fairness.py)."""

from __future__ import annotations

import math

from ops.bench.quorum_fairness import FleetModel, Setting, run_setting
from shared.rounds import quorum_members

ARRIVALS = {"fast": 0.01, "a": 1.0, "b": 1.2, "c": 2.5, "slow": 6.0, "lost": math.inf}


def test_without_a_wait_the_first_answers_fill_the_quorum() -> None:
    assert quorum_members(ARRIVALS, 2) == {"fast", "a"}
    assert quorum_members(ARRIVALS, 6) == {"fast", "a", "b", "c", "slow"}  # closes at the deadline (inf)
    assert quorum_members(ARRIVALS, 6, deadline=3.0) == {"fast", "a", "b", "c"}


def test_a_minimum_wait_takes_every_answer_within_it() -> None:
    assert quorum_members(ARRIVALS, 2, min_wait=3.0) == {"fast", "a", "b", "c"}
    assert quorum_members(ARRIVALS, 2, min_wait=0.5) == {"fast", "a"}  # the quorum came after the wait
    assert quorum_members(ARRIVALS, 2, min_wait=10.0, deadline=5.0) == {"fast", "a", "b", "c"}


def test_the_wait_dilutes_the_fast_board_and_lets_honest_boards_in() -> None:
    fleet = FleetModel(jetsons=10, pi4s=0)
    rush = run_setting(Setting(1.5, 0.0), fleet, rounds=100, devices=6, quorum=0.8, deadline_s=60, seed=0)
    wait = run_setting(Setting(1.5, 3.0), fleet, rounds=100, devices=6, quorum=0.8, deadline_s=60, seed=0)
    assert rush["malicious_in_quorum"]["mean"] == wait["malicious_in_quorum"]["mean"] == 1.0
    assert rush["jetson_in_quorum"]["mean"] < 0.8 and wait["jetson_in_quorum"]["min"] >= 0.98
    assert wait["malicious_vote_share"] < rush["malicious_vote_share"]
