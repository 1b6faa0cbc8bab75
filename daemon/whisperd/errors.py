"""The one base of whisperd's own errors, and whether trying again can help.

Whether an error is permanent is a property of the error, stated where it is raised, not guessed
later from its type: a file that is not audio stays not audio, a worker that ran out of memory
may not next time. The retry policy reads `permanent` and nothing else.
"""

from __future__ import annotations

import errno

# OS errors about the file itself, not the moment: another try meets the same file.
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG})


class WhisperdError(Exception):
    """Base of whisperd's errors; `str()` is a sentence for the user (it names the file)."""

    permanent: bool = False


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: declared by whisperd's errors, decided by errno for OS errors."""
    declared = getattr(exc, "permanent", None)
    if isinstance(declared, bool):
        return declared
    return isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS
