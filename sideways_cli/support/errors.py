"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A bad file, option or value; the message names it and says how to fix it."""


def print_user_error(exc: BaseException) -> None:
    """The one line a user mistake gets, on stderr."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                               soft_wrap=True)
