"""Exceptions with messages that name the file and the fix."""


class HistoMoEError(Exception):
    """Base class for errors a user can act on."""


class DataError(HistoMoEError, ValueError):
    """Bad or inconsistent input data (counts, coordinates, images)."""


class FetchError(HistoMoEError, FileNotFoundError):
    """A dataset file could not be found locally nor downloaded, or failed verification."""


class UnknownNameError(HistoMoEError, KeyError):
    """A name (dataset, encoder, model, ...) that no registry knows; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
