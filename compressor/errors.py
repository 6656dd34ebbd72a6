class CompressorError(Exception):
    """A user-facing error: one clear sentence."""
