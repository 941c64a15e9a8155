"""The one exception of the FID modules (captions, extractors, statistics, protocol): callers catch one type."""


class FIDError(ValueError):
    """An FID setup problem (bad setting, missing weights or captions); the message says what to do."""
