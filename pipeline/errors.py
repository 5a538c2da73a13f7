"""The one base class of expected errors.

Every error that a user can cause and fix (a bad config key, broken data, a missing or incompatible
checkpoint, a diverging run...) subclasses :class:`UserError`. The entry points (:mod:`pipeline.cli`)
catch ``UserError`` once and print it as one line with exit code 2; anything else is a bug and keeps its
traceback. This module imports nothing from the package: every layer may raise these.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected problem the user can fix; the message names the key, file or value and the fix."""
