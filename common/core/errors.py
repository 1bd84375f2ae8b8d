"""Errors shared by every floor of common/ (the message contracts re-export them)."""


class ContractError(ValueError):
    """A message (or the arrays in it) does not satisfy its contract; the text names what is wrong and holds
    no user data."""
