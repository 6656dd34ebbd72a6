"""The one exception the commands turn into a one-sentence message and a non-zero exit."""


class CompressorError(Exception):
    """A user-facing error: one clear sentence."""
