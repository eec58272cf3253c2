"""CollectiveError, where the collectives layer has always exported it (defined in disttrain.errors,
a leaf module, so that the group layer below comm can raise it too)."""
from ..errors import CollectiveError

__all__ = ["CollectiveError"]
