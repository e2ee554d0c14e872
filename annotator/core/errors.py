"""The errors a run reports to its user: each names what is wrong and what to change."""


class OutputDirError(ValueError):
    """The output directory cannot be used as it is."""


class RunError(RuntimeError):
    """The run finished in a state that breaks its own invariants."""


class ResourceError(RuntimeError):
    """The cluster cannot hold what a pass reserves: said at start instead of waiting forever."""
