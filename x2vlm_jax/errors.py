"""The one exception type for a user's mistake, which the command lines print without a traceback.

A wrong path, a config value that cannot work, a checkpoint of another model, a data glob that
matches nothing: raise `InputError` with a message that names the bad value (the flag or config
field it came from) and what to do. `main.py`, `x2vlm` and the tools print such an error (and
`FileNotFoundError`, `NotADirectoryError`, `FileExistsError`) as one `error: ...` line and exit
with status 1; any other exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """A mistake in what the user gave; its message is the whole report."""


# What a command line reports in one line instead of a traceback.
REPORTED = (InputError, FileNotFoundError, NotADirectoryError, FileExistsError)
