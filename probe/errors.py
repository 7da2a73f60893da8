"""One exception root for the probe; each failure a small subclass.

Transport failures never travel as exceptions above the transports: they become
`Failure` values (see probe.transports.base).
"""

from __future__ import annotations

__all__ = ["BlockprobeError", "CatalogueError", "InputError", "SpecError"]


class BlockprobeError(Exception):
    """Something the user gave us is wrong."""


class InputError(BlockprobeError):
    """A domain, qtype or option is not valid."""


class SpecError(InputError):
    """A resolver spec is not valid."""


class CatalogueError(BlockprobeError):
    """The resolver catalogue data file is not valid."""
