"""Errors of moving weights between peers. Each message tells the user what happened and what to do."""

from peerpipe.errors import PeerpipeError


class WeightsError(PeerpipeError):
    """Base of every weights error."""


class ManifestError(WeightsError):
    """A manifest is malformed, unsafe (a path in a file name) or does not match its model's config."""


class FetchError(WeightsError):
    """The weights a stage needs could not be fetched: no holder has them, or every copy was bad."""


class DiskSpaceError(WeightsError):
    """The cache has not room for the weights to fetch."""


class HolderGone(WeightsError):
    """A peer left or stopped answering while it was sending weights (another holder takes over)."""
