"""The dp x pp x tp rank grid: which ranks hold which slice of the model, and their groups.

World rank = (dp_rank * pp + pp_rank) * tp + tp_rank. Tensor-parallel ranks are innermost - they
are consecutive, so on a real cluster they share a host and its fast links (TP communicates in
every layer); pipeline neighbours come next (point-to-point activations once per micro-batch);
data-parallel replicas are outermost (one gradient allreduce per step) - the placement Megatron-LM
uses (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters").

    mesh = Mesh(dp=2, pp=2, tp=2)          # collective: every rank of the world calls it
    mesh.tp_group, mesh.pp_group, mesh.dp_group     # Groups usable as group= in collectives
    mesh.pp_rank, mesh.pp_is_last_stage, mesh.pp_next_rank (a world rank, None on the last stage)

Validated at start-up on every rank: a world size that is not dp x pp x tp, non-positive sizes,
or ranks that disagree about the mesh raise ValueError / CollectiveError everywhere - none hangs.
"""
from __future__ import annotations

from ..comm import validate
from ..groups import Group, world
from ..runtime import creator, split


class Mesh:
    """A dp x pp x tp grid over the world (or over `group`'s ranks)."""

    def __init__(self, dp: int = 1, pp: int = 1, tp: int = 1, group: Group | None = None, *, tag=None):
        """`tag`: needed when the mesh is made off the main thread (runtime.creator says why)."""
        g = group or world()
        sizes = dict(dp=dp, pp=pp, tp=tp)
        err = None
        if any(not isinstance(v, int) or v < 1 for v in sizes.values()):
            err = f"mesh sizes must be positive ints, got dp={dp} pp={pp} tp={tp}"
        elif dp * pp * tp != g.size:
            err = (f"mesh dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, but the job has {g.size}: "
                   f"launch {dp * pp * tp} ranks or choose sizes whose product is {g.size}")
        fields, thread_err = creator("Mesh", tag)
        validate.check(g.comm, "Mesh", sizes | fields, err or thread_err, always=True)  # the same verdict everywhere
        self.dp, self.pp, self.tp, self.base = dp, pp, tp, g
        r = g.rank
        self.dp_rank, rest = divmod(r, pp * tp)
        self.pp_rank, self.tp_rank = divmod(rest, tp)
        # One Split per kind creates every group of that kind at once (color = the other coordinates).
        self.tp_group = self._split(g, (self.dp_rank, self.pp_rank), self.tp_rank,
                                    [self.rank_of(self.dp_rank, self.pp_rank, t) for t in range(tp)])
        self.pp_group = self._split(g, (self.dp_rank, self.tp_rank), self.pp_rank,
                                    [self.rank_of(self.dp_rank, s, self.tp_rank) for s in range(pp)])
        self.dp_group = self._split(g, (self.pp_rank, self.tp_rank), self.dp_rank,
                                    [self.rank_of(d, self.pp_rank, self.tp_rank) for d in range(dp)])

    def free(self) -> None:
        """Release the three groups' communicators (collective over the mesh's ranks)."""
        for g in (self.tp_group, self.pp_group, self.dp_group):
            g.free()

    def __enter__(self) -> "Mesh":
        return self

    def __exit__(self, *exc) -> bool:
        self.free()
        return False

    def rank_of(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        """The rank (in the mesh's base group) at these coordinates."""
        return (dp_rank * self.pp + pp_rank) * self.tp + tp_rank

    @staticmethod
    def _split(g: Group, color: tuple, key: int, ranks: list) -> Group:
        # an int color from the two other coordinates; ranks are positions in g
        return split(g, color[0] * 1_000_003 + color[1], key, [g.ranks[i] for i in ranks])

    # ----------------------------------------------------------------- pipeline neighbours
    @property
    def pp_is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def pp_is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_next_rank(self) -> int | None:
        """World rank of the next stage (same dp and tp coordinates), None on the last stage."""
        return None if self.pp_is_last_stage else self.pp_group.ranks[self.pp_rank + 1]

    @property
    def pp_prev_rank(self) -> int | None:
        """World rank of the previous stage, None on the first stage."""
        return None if self.pp_is_first_stage else self.pp_group.ranks[self.pp_rank - 1]

    @property
    def coords(self) -> dict:
        return dict(dp_rank=self.dp_rank, pp_rank=self.pp_rank, tp_rank=self.tp_rank)

    def __repr__(self) -> str:
        return (f"Mesh(dp={self.dp}, pp={self.pp}, tp={self.tp}; this rank dp={self.dp_rank} pp={self.pp_rank} "
                f"tp={self.tp_rank})")
