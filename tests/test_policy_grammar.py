"""The bucket policy grammar, property-tested: every policy survives str() and parse; bad text is one ValueError line."""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lookalike.cache.policies import BucketPolicy, parse_policy

# Generation speed depends on the machine's load, not on the grammar: no time limits.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

decimals = st.from_regex(r"\A[0-9](\.[0-9]{1,6})?\Z") | st.just("10")  # as typed: 0.25, 3, 0.00001 (at most 10)
counts = st.integers(1, 10_000)
sizes = st.integers(1, 100)


@st.composite
def policy_texts(draw) -> str:
    """Text the whole grammar accepts: flat[@W], top1, topk:N[~T], fused[:N[~T]][@W], then optionally +soft:M (not
    after flat), +white, +dba:K[@a], +qe:K[@a] and +krecip:K1/K2."""
    kind = draw(st.sampled_from(["flat", "top1", "topk", "fused"]))
    text = kind
    if kind == "topk" or (kind == "fused" and draw(st.booleans())):
        text += f":{draw(counts)}"
        if draw(st.booleans()):
            text += f"~{draw(st.integers(1, 10**6)).__truediv__(10**6):f}".rstrip("0")
    if kind in ("fused", "flat") and draw(st.booleans()):
        text += f"@{draw(decimals)}"
    if kind != "flat" and draw(st.booleans()):
        text += f"+soft:{draw(counts)}"
    if draw(st.booleans()):
        text += "+white"
    for part in ("dba", "qe"):
        if draw(st.booleans()):
            text += f"+{part}:{draw(sizes)}" + (f"@{draw(decimals)}" if draw(st.booleans()) else "")
    if draw(st.booleans()):
        text += f"+krecip:{draw(sizes)}/{draw(sizes)}"
    return text


@RELAXED
@given(policy_texts())
@example("fused:3~0.00001@0.00002+soft:2")
@example("topk:1")
def test_every_policy_round_trips_through_its_text(text):
    policy = parse_policy(text)
    assert isinstance(policy, BucketPolicy)
    assert parse_policy(str(policy)) == policy


@RELAXED
@given(st.text(max_size=40))
@example("fla\nt")
@example("topk:3~1.2.3")
@example("fused@")
@example("flat+white+white")
@example("flat+dba:2+white")
@example("flat+whitened")
def test_any_other_text_parses_or_is_refused_in_one_line(text):
    try:
        policy = parse_policy(text)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text, message", [
    ("flat+dba:100000", "re-ranking sizes (K, K1, K2) must be from 1 to 100"),
    ("flat+qe:101", "re-ranking sizes"),
    ("flat+krecip:20/" + "9" * 5000, "the longest is 200"),
    ("flat+krecip:20/999", "re-ranking sizes"),
    ("flat@" + "9" * 150, "W must be a number from 0 to 10"),
    ("flat+dba:5@11", "a must be a number from 0 to 10"),
    ("topk:" + "9" * 30, "N and M must be at most 99999"),
    ("flat+dba:2+white", "unknown bucket policy"),  # +white comes before the other re-ranking parts
])
def test_a_policy_from_a_request_is_bounded(text, message):
    """Every entry point parses policies here: sizes bound the work per query, decimals are finite and bounded."""
    from lookalike.models.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        parse_policy(text)
