"""blockprobe's probe: measure whether DNS blocks are enforced, and whether they overreach."""

__version__ = "0.1.0"
