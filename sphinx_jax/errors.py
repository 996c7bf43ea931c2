"""The one exception type users see.

Every user-facing failure (bad config field, unreadable checkpoint, a tensor with no place, bad image)
raises `SphinxError` with one line: what failed, where (file, key, record id), and what to do.
The CLI prints that line and exits non-zero.
"""


class SphinxError(Exception):
  """A failure the user can act on; the message names the file/key/field and the fix."""
