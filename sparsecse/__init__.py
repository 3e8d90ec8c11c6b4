"""sparsecse: sparse contrastive learning of sentence embeddings (An, Zhang & Song 2023)."""

__version__ = "0.1.0"


class SparseCSEError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits with code 2."""


class RunFailed(SparseCSEError):
    """Work that was valid input failed (one line, exit code 1: not 2, which means bad input)."""


class TrialsFailed(RunFailed):
    """A sweep finished and wrote its report, but some trials failed."""


class Interrupted(KeyboardInterrupt):
    """The user pressed Ctrl-C: the CLI prints the message (how to resume) and exits 130."""
