"""Errors raised by the library. The CLI maps them to exit codes; the library never exits."""


class LowRankError(ValueError):
    """Bad input to a decomposition, layer factorization or rank selection.

    Messages name the received value and what is accepted.
    """


class UnsupportedLayerError(LowRankError):
    """The module type or configuration cannot be factorized by the requested method."""


class LeftDense(LowRankError):
    """The rank rule leaves this layer dense (a runner records the reason and goes on)."""


class RankTooLargeError(LeftDense):
    """The rank would make the factorized layer larger than the dense one (pass
    ``allow_larger=True`` to accept that on purpose)."""


class NoStructureError(LeftDense):
    """VBMF finds no component above its noise estimate (rank 0) and the rule says to leave such a
    layer dense (``zero='dense'``)."""
