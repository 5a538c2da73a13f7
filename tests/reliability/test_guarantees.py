"""README.md's "What is guaranteed" section is generated from the reliability tests (guarantees.py)."""
from __future__ import annotations

from guarantees import HEADING, README, current, section


def test_readme_section_matches_the_tests():
    assert current() == "\n" + section(), (
        f"'{HEADING}' in {README} is stale; regenerate it with: python tests/reliability/guarantees.py --write")
