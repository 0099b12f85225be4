"""Which trial failures a retry can fix, and the exceptions that say so.

A retry restarts a trial from its last checkpoint with the same configuration and seed.
That cures what the machine did (a killed worker, a lost node, an unreachable service,
a transient I/O error) but not what the trial itself does: a non-finite loss comes back
at the same step, a configuration that does not validate never will, a checkpoint made
by another configuration stays foreign. Those are *non-retryable*: the trial fails once,
with the reason, and is not restarted (``normlab resume`` tries it again on request).
A full storage disk is non-retryable too: every retry would fail the same way until
someone frees space.
"""

from __future__ import annotations

import errno

from pydantic import ValidationError

from trainables.registry import UnknownNameError


class NonRetryableError(Exception):
    """A failure that a restart from the last checkpoint would repeat."""


class TrialConfigError(NonRetryableError, ValueError):
    """The trial's configuration does not validate (or cannot run: batch larger than the data, ...)."""


class StorageFullError(NonRetryableError, OSError):
    """No space left where the trial writes its checkpoints."""


def is_disk_full(error: BaseException) -> bool:
    """An ``OSError`` for ENOSPC/EDQUOT, also when a library kept only the message (pyarrow)."""
    if not isinstance(error, OSError):
        return False
    return error.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error)


def is_retryable(error: BaseException) -> bool:
    """Whether restarting the trial from its last checkpoint could succeed."""
    if isinstance(error, (NonRetryableError, ValidationError, UnknownNameError)):
        return False
    return not is_disk_full(error)


def describe(error: BaseException) -> str:
    """``Type: message`` on one line (the first 2000 characters), for run tags and tables."""
    text = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {text}"[:2000]
