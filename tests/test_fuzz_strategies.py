"""Shared pieces of the property-based (hypothesis) tests of the parsers (tests/test_fuzz_*.py):
settings profiles, the per-parser example counter that bench/fuzz.py prints, common strategies
and the "typed error naming the input" assertion.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default: a few seconds per parser in ``make test``),
``dev`` (5x more), ``bench`` (bench/fuzz.py: a large budget). Every profile bounds the time per
example (``deadline``) so that a parser that hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import string
from collections import Counter
from datetime import timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_COMMON = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None,
               print_blob=True)
settings.register_profile("ci", max_examples=80, deadline=timedelta(milliseconds=2000), **_COMMON)
settings.register_profile("dev", max_examples=400, deadline=timedelta(milliseconds=2000), **_COMMON)
settings.register_profile("bench", max_examples=2000, deadline=timedelta(milliseconds=5000), **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

#: examples run per parser in this process (bench/fuzz.py prints it)
EXAMPLES: Counter[str] = Counter()


def count(parser: str) -> None:
    """One more example run against ``parser``."""
    EXAMPLES[parser] += 1


def assert_names(exc: BaseException, name: str) -> None:
    """A typed error must name the input and give a reason (text beyond the name)."""
    text = str(exc)
    assert name in text, f"{exc.__class__.__name__} does not name the input {name!r}: {text!r}"
    assert len(text.replace(name, "").strip(" :'\"")) >= 5, f"no reason in {text!r}"


# ------------------------------------------------------------------ strategies

#: small printable text with the characters that break line-based parsers
junk_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=200)
line_noise = st.text(alphabet=string.printable + "\t\r\x00\x0b\x0c\u00e9\u2028\ufeff", max_size=120)

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([2**63, -(2**63) - 1, 10**308, 0, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)


def test_profiles_bound_every_example():
    """The active profile has a deadline (no parser can hang the suite) and a bounded budget."""
    active = settings.get_profile(PROFILE)
    assert active.deadline is not None and active.deadline <= timedelta(seconds=5)
    assert 0 < active.max_examples <= 5000


def scaled(fraction: float):
    """Settings with ``fraction`` of the active profile's example budget (for costly properties)."""
    return settings(max_examples=max(10, int(settings.get_profile(PROFILE).max_examples * fraction)))
