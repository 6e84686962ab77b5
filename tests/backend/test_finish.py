"""check_stop: which token ends a request and why, at every boundary and in order of precedence."""

import pytest

from inflight.backend.engine.finish import check_stop

EOS, STOP_ID, OTHER = 2, 7, 5
STOP_IDS = frozenset({EOS, STOP_ID})


def _check(token_id=OTHER, stop_string=None, num_output_tokens=1, max_tokens=4):
    return check_stop(token_id, stop_string, num_output_tokens, STOP_IDS, max_tokens)


def test_an_ordinary_token_below_every_limit_goes_on() -> None:
    assert _check() is None
    assert check_stop(OTHER, None, 1, frozenset(), 4) is None  # no stop ids at all


@pytest.mark.parametrize("token_id", [EOS, STOP_ID])
def test_a_stop_token_stops_with_its_id(token_id: int) -> None:
    assert _check(token_id) == ("stop", token_id)


def test_a_stop_string_stops_with_the_string() -> None:
    assert _check(stop_string="###") == ("stop", "###")


@pytest.mark.parametrize(
    ("num_output_tokens", "expected"), [(3, None), (4, ("length", None)), (5, ("length", None))]
)
def test_max_tokens_ends_at_exactly_the_last_token(num_output_tokens: int, expected) -> None:
    assert _check(num_output_tokens=num_output_tokens, max_tokens=4) == expected


def test_precedence_stop_token_then_stop_string_then_length() -> None:
    """A token can meet several conditions at once; the reason reported is the first of the list."""
    at_both_limits = {"num_output_tokens": 4, "max_tokens": 4}
    assert _check(STOP_ID, "###", **at_both_limits) == ("stop", STOP_ID)
    assert _check(OTHER, "###", **at_both_limits) == ("stop", "###")
    assert _check(OTHER, None, **at_both_limits) == ("length", None)
