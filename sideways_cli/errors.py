"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A bad file, option or value; the message names it and says how to fix it."""
