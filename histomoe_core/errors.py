"""Exceptions with messages that name the file and the fix."""


class HistoMoEError(Exception):
    """Base class for errors a user can act on."""


class DataError(HistoMoEError, ValueError):
    """Bad or inconsistent input data (counts, coordinates, images)."""


class FetchError(HistoMoEError, FileNotFoundError):
    """A dataset file could not be found locally nor downloaded, or failed verification."""
