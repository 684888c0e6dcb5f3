"""What a user can cause, and how every command reports it.

``UserError`` is the one exception type for mistakes a user can make (bad paths, shapes,
bit-widths, ...): its message names the input and how to fix it. ``expected_failure`` turns the
failures the world can cause without any bug of ours (a full disk, a read-only folder, a file that
is not text) into such a message too. The command entries print either as one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with the user's input. The message names the input and how to fix it."""


class TrainingDiverged(UserError):
    """A loss became NaN or infinite: the stage stopped; ``checkpoint`` is its last finished
    epoch's, kept (None when no epoch had finished)."""

    def __init__(self, message: str, checkpoint=None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint

    def __reduce__(self):  # pickled whole (a stage training in its own process sends it)
        return type(self), (str(self), self.checkpoint)


# errno -> what to do about it
_OS_FIXES = {
    errno.ENOSPC: "free disk space (or choose another --out), then continue with --resume",
    errno.EDQUOT: "free disk space within your quota, then continue with --resume",
    errno.EROFS: "the file system is read-only; choose a writable --out",
    errno.EACCES: "you may not write or read there; choose a folder you own (--out)",
    errno.EPERM: "you may not write or read there; choose a folder you own (--out)",
    errno.ENOTDIR: "a file stands where a folder is needed; give a folder's path",
    errno.EISDIR: "a folder stands where a file is needed; give a file's path",
    errno.EEXIST: "a file is in the way; remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer data.workers",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def expected_failure(error: BaseException) -> str | None:
    """One line for a failure the user's machine or files caused, or None for a bug."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in _OS_FIXES:
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        what = error.strerror or type(error).__name__
        return f"{what}{f': {where}' if where else ''}; {_OS_FIXES[error.errno]}"
    if isinstance(error, MemoryError):
        return (
            "out of memory; use smaller batches (student.train.batch_size, "
            "teacher_train.batch_size) or a smaller data.image_size"
        )
    if isinstance(error, UnicodeDecodeError):
        return (
            f"a file that should be UTF-8 text is not ({error.reason} at byte {error.start}); "
            "save it as UTF-8"
        )
    return None
