"""Errors raised for bad input, each naming the file (or shard and key) at fault."""


class BadInputError(ValueError):
    """An input file or sample cannot be used; the message names it and says why.

    Args:
        where: the file path, URL or ``shard:key`` that is at fault.
        reason: what is wrong with it, in words a user can act on.
    """

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
