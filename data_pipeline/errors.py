"""Errors raised for bad input data.

A DataError carries one line that names the file (and record, where known) at fault; the command-line
entry points print that line alone, without a stack trace.
"""

import errno
import re


class DataError(Exception):
    """Bad or missing input data; the message names the file and record at fault."""


class DiskFullError(Exception):
    """A write failed because the disk, a quota or the file-size limit is full; the message names the file.

    Not bad input (exit status 1, not 2): the same command succeeds once there is room. Whatever was
    complete before the failed write is kept (datasets, exports and checkpoints are renamed into place only
    when whole).
    """


_FULL_ERRNOS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EFBIG: "File too large"}


def as_disk_full(exc: BaseException) -> DiskFullError | None:
    """The DiskFullError ``exc`` stands for, or None when it is not about a full disk.

    Recognises OSError with ENOSPC / EDQUOT / EFBIG and TensorFlow's errors for the same (TensorFlow's file
    writers raise ResourceExhaustedError "<file>; No space left on device" and keep the file in the message).
    """
    if isinstance(exc, DiskFullError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        reason = _FULL_ERRNOS[exc.errno]
        return DiskFullError(f"{exc.filename}: {reason}" if exc.filename else reason)
    message = str(getattr(exc, "message", "") or "")
    for reason in _FULL_ERRNOS.values():
        if reason in message:
            first = next(line for line in message.splitlines() if reason in line)
            first = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$", "", first).strip()
            return DiskFullError(first.replace("; " + reason, ": " + reason))
    return None
