"""lighten: make existing transformer models light."""

__version__ = "0.1.0"
