"""The one exception type of the collectives layer (a leaf module: every layer raises it)."""


class CollectiveError(RuntimeError):
    """Raised on *every* rank of a group when a collective call is inconsistent or invalid.

    Covers mismatched shapes, dtypes, ops, algorithms, roots or splits across ranks, unknown
    algorithm/op names and bad arguments. The message names the ranks that disagree and what each
    passed, so the fix is obvious without attaching a debugger to N processes.
    """
