"""The one exception type users see for bad input.

Every message names the file / array / argument at fault and says what was expected
and what was found, so the command line can print it as a single line and exit 2.
"""


class MoetraceError(ValueError):
    """Bad input or state that the user can fix (wrong file, shape, value, flag)."""
