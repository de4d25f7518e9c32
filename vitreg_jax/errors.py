"""The one exception type for user mistakes: the CLI prints its message on one line and exits with status
2."""


class UserError(Exception):
    """A mistake the user can fix (missing file, wrong format, unsupported option, bad size...).

    The message names the thing and what was expected; it is shown as one line, without a traceback.
    """
