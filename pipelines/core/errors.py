"""Errors that the platform reports to a person, not as a traceback.

Every error names *what* is wrong and *where* (a file, a column, a flag), so the
command-line entry points can print one line and exit non-zero.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Base class: an error with a message meant for the user."""


class DataError(PlatformError):
    """Input data is missing, malformed or fails validation.

    `location` is the file, folder or URL at fault; it leads the message.
    """

    def __init__(self, message: str, location: str | None = None):
        self.location = location
        self.reason = message
        super().__init__(f"{location}: {message}" if location else message)


class DownloadError(DataError):
    """A download failed, was interrupted, or its checksum does not match."""


class ConfigError(PlatformError):
    """A flag or setting has an invalid value; the message names the flag."""
