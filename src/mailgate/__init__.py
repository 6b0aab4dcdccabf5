"""mailgate: a mail transport server with Exchange's connector model and cmdlets."""

__version__ = "0.1.0"
