"""policyd: a relay-control policy service for Postfix."""

__version__ = "0.1.0"
