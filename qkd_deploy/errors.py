"""The one exception type for mistakes a user can make (bad paths, shapes, bit-widths, ...).

The CLI prints its message without a traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the input and how to fix it."""
