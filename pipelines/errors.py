"""Error types. `ItfitsError` is what a user can cause; the CLI prints it in one line and exits non-zero."""
import difflib


class ItfitsError(Exception):
    """A problem with the user's input or setup, with the way out in its message."""


class ItfitsWarning(UserWarning):
    """Something the user should know that does not stop the run (a fallback, a risky setting); the CLI
    prints it as one line, `warning: ...`."""


def did_you_mean(value: str, choices) -> str:
    """' did you mean 'x'?' when `value` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" did you mean '{close[0]}'?" if close else ""
