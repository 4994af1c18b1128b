"""Errors raised by the library. The CLI maps them to exit codes; the library never exits."""


class LowRankError(ValueError):
    """Bad input to a decomposition, layer factorization or rank selection.

    Messages name the received value and what is accepted.
    """


class UnsupportedLayerError(LowRankError):
    """The module type or configuration cannot be factorized by the requested method."""


class RankTooLargeError(LowRankError):
    """The rank would make the factorized layer larger than the dense one (pass
    ``allow_larger=True`` to accept that on purpose)."""
