"""The episode store's exceptions (assembler, collector and store share them)."""

from __future__ import annotations


class UnknownEpisodeError(ValueError):
    """The episode id was never started (assembler) or is not in the catalogue (store)."""


class LateStepError(ValueError):
    """A step arrived for an episode that has already ended; it is not part of the stored episode."""


class EpisodeStateError(ValueError):
    """An episode event contradicts what is already known (second START with other metadata, END twice)."""


class EpisodeConflictError(ValueError):
    """An episode id is written again with different content; the stored one is kept."""


class CorruptEpisodeError(RuntimeError):
    """An episode file is missing, fails its checksum, or cannot be decoded."""


class StoreLockedError(RuntimeError):
    """Another EpisodeStore (this or another process) already writes to this root."""
