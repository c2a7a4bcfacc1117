"""The project's one exception for bad input: what the user asked for or gave us cannot be used.

Scripts turn it into one line on stderr and exit status 2 (:func:`common.cli.run_main`); library code raises it
with a message that names the file or flag and the rule it breaks.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user asked for or gave us; printed as one line, exit status 2."""
