"""The two ways a command fails: bad usage (exit 2) and runtime failure (exit 1). Both are `HiresrunError`, the one
exception type the Python API raises; its message is the line the command line prints after `hiresrun: error:`."""


class HiresrunError(Exception):
    """A hiresrun failure: one line naming the problem and the fix; `exit_code` is the command line's."""

    exit_code = 1


class UsageError(HiresrunError):
    """A bad option, path or value: one line naming the problem and the fix, exit code 2."""

    exit_code = 2


class DataError(HiresrunError):
    """Unreadable or missing data found at run time: one line naming the file, exit code 1."""

    exit_code = 1


class Unsupported(UsageError):
    """A method, accelerator and model that cannot work together (hiresrun/support.py): refused before any work.
    In a sweep (`-m`) the job is recorded as refused (status.json) and the sweep goes on."""
