"""The bucket policy grammar, property-tested: every policy survives str() and parse; bad text is one ValueError line."""
from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lookalike.cache.policies import BucketPolicy, parse_policy

# Generation speed depends on the machine's load, not on the grammar: no time limits.
RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

decimals = st.from_regex(r"\A(0|[1-9][0-9]{0,3})(\.[0-9]{1,6})?\Z")  # as typed: 0.25, 3, 0.00001, 1500.5
counts = st.integers(1, 10_000)


@st.composite
def policy_texts(draw) -> str:
    """Text the grammar accepts: flat, top1, topk:N[~T], fused[:N[~T]][@W], each optionally +soft:M."""
    kind = draw(st.sampled_from(["flat", "top1", "topk", "fused"]))
    if kind == "flat":
        return "flat"
    text = kind
    if kind == "topk" or (kind == "fused" and draw(st.booleans())):
        text += f":{draw(counts)}"
        if draw(st.booleans()):
            text += f"~{draw(st.integers(1, 10**6)).__truediv__(10**6):f}".rstrip("0")
    if kind == "fused" and draw(st.booleans()):
        text += f"@{draw(decimals)}"
    if draw(st.booleans()):
        text += f"+soft:{draw(counts)}"
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
def test_any_other_text_parses_or_is_refused_in_one_line(text):
    try:
        policy = parse_policy(text)
    except ValueError as err:
        assert str(err) and "\n" not in str(err)
    else:
        assert parse_policy(str(policy)) == policy
