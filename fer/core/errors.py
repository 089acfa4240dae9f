"""User-facing errors.

Anything the user can fix (a missing folder, a bad `--set` key, an unknown backbone) raises
`UserError`. The CLI turns it into one line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit status 2)."""
