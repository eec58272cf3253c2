"""Pure logic of the algorithms: partitions, trees, registries, cost model (one process)."""
import math
import os

import numpy as np
import pytest

import disttrain as dt
from disttrain.comm import costmodel
from disttrain.comm.p2p import partition, pow2_below, real_rank, segments
from disttrain.comm.registry import ALLREDUCE
from disttrain.comm.tree import tree_links, tree_root


@pytest.mark.parametrize("n", [0, 1, 5, 17, 100])
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_partition_is_array_split(n, parts):
    counts, displs = partition(n, parts)
    ref = np.array_split(np.arange(n), parts)
    assert [len(b) for b in ref] == counts.tolist()
    assert [int(b[0]) if len(b) else None for b in ref] == [int(d) if c else None for d, c in zip(displs, counts)]


def test_segments_cover_exactly():
    for count in (0, 1, 10, 11):
        segs = segments(5, count, 3)
        assert sum(m for _, m in segs) == count and all(0 < m <= 3 for _, m in segs)
        assert [o for o, _ in segs] == list(range(5, 5 + count, 3))


@pytest.mark.parametrize("p", list(range(1, 40)) + [64, 100, 127, 128])
def test_fold_renumbering_is_a_bijection(p):
    rem = p - pow2_below(p)
    survivors = [r for r in range(p) if r >= 2 * rem or r % 2 == 1]
    assert sorted(real_rank(i, p) for i in range(pow2_below(p))) == survivors


@pytest.mark.parametrize("p", list(range(1, 70)) + [128, 255, 1000])
def test_trees_are_spanning_and_complementary(p):
    for shift in (0, 1, 3 % p):
        parent, children = tree_links(p, shift)
        root = tree_root(p, shift)
        assert parent[root] == -1 and sum(q == -1 for q in parent) == 1
        for r in range(p):  # every rank reaches the root: a tree, not a forest or a cycle
            seen, q = 0, r
            while parent[q] != -1:
                q, seen = parent[q], seen + 1
                assert seen <= p
            assert q == root
            assert all(parent[c] == r for c in children[r]) and len(children[r]) <= 2
        height = max(_depth(parent, r) for r in range(p))
        assert height <= max(1, math.ceil(math.log2(p)))
    interior1 = {r for r, c in enumerate(tree_links(p, 0)[1]) if c}
    interior2 = {r for r, c in enumerate(tree_links(p, 1)[1]) if c}
    assert not interior1 & interior2, "double tree: no rank may be interior in both trees"


def _depth(parent, r):
    d = 0
    while parent[r] != -1:
        r, d = parent[r], d + 1
    return d


def test_public_names_and_registry():
    for name in ("ring", "tree", "double_tree", "butterfly", "rabenseifner", "ps", "mpi"):
        assert name in dt.ALLREDUCE_ALGORITHMS
    for name in ("pairwise", "bruck", "mpi"):
        assert name in dt.ALLTOALL_ALGORITHMS
    assert ALLREDUCE.problem("ring") is None and ALLREDUCE.problem("ps:3") is None
    assert "unknown" in ALLREDUCE.problem("rign") and "takes no parameter" in ALLREDUCE.problem("ring:2")
    assert "positive integer" in ALLREDUCE.problem("ps:x") and "must be a str" in ALLREDUCE.problem(3)


def test_cost_model_shapes():
    c = costmodel.CostParams(8, alpha=5e-6, beta=1e-10, gamma=2e-10)
    small, large = 64, 64 << 20
    # every allreduce algorithm registers its formula with itself: "auto" considers them all
    assert set(ALLREDUCE.costs) == set(ALLREDUCE.names())
    # shm moves bytes through memory on one node, not messages: compared separately below
    pr = {a: costmodel.predict(c, a, small) for a in ALLREDUCE.costs if a not in ("mpi", "shm")}
    pl = {a: costmodel.predict(c, a, large) for a in ALLREDUCE.costs if a not in ("mpi", "shm")}
    assert costmodel.predict(c, "shm", large) < min(pl.values())  # each byte copied once, not sent
    assert costmodel.predict(costmodel.CostParams(8, hosts=2), "shm", large) == math.inf
    assert min(pr, key=pr.get) == "butterfly"  # latency-bound: fewest rounds
    assert min(pl, key=pl.get) in ("ring", "rabenseifner", "ps")  # bandwidth-bound: 2(p-1)/p n
    assert pl["tree"] > pl["double_tree"] > pl["ring"]
    assert costmodel.predict(c, "ps:1", large) > costmodel.predict(c, "ps", large)  # one server: a hot spot
    c.native = [(8, 3e-6), (1 << 20, 2e-4)]
    assert math.isclose(ALLREDUCE.costs["mpi"][0](c, 1 << 10), math.exp(np.interp(math.log(1024), np.log([8, 1 << 20]),
                                                                         np.log([3e-6, 2e-4]))))


def test_async_runs_synchronously_without_thread_multiple():
    from disttrain.comm.engine import Engine

    e = Engine()
    e._allowed = False  # as if MPI had granted less than MPI_THREAD_MULTIPLE
    h = e.submit(lambda: 41 + 1)
    assert h.test() and h.wait() == 42 and e._thread is None
    bad = e.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.wait()


def test_the_zoo_is_not_a_top_level_models_package_and_a_user_models_package_still_works(tmp_path):
    """Issue 17: `pip install` must not put a package named `models` into site-packages (it shadowed
    a user project's own models/ and broke the README's examples there). The zoo installs as
    `disttrain_zoo`, and the main job finds it through the "disttrain.models" entry points."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('models'), "
                          "u.find_spec('disttrain_zoo') is not None)"], cwd=empty, capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.stdout.split() == ["None", "True"], (res.stdout, res.stderr)  # installed: the zoo, not `models`
    from disttrain import zoo

    assert {"mlp", "gnmt", "dlrm", "transformer"} <= set(zoo.names())
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("USER_PROJECT = True\n")
    code = ("import models; assert models.USER_PROJECT\n"
            "import numpy as np, disttrain as dt\n"
            "from disttrain_zoo.mlp import MLP\n"
            "from disttrain import zoo\n"
            "assert zoo.model('mlp') is MLP\n"
            "model = MLP([64, 32, 10]); print(model.forward(np.ones((2, 64), np.float32)).shape)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0 and "(2, 10)" in res.stdout, res.stderr


def test_collectives_take_algorithm_and_group_as_keywords_in_one_order():
    """Issue 17: `group` and `algorithm` keyword-only everywhere, in one order, so that no call can
    pass one for the other (broadcast and allgather used to take group before algorithm)."""
    import inspect

    for fn in (dt.allreduce, dt.allreduce_, dt.allreduce_async, dt.allreduce_async_, dt.reduce_scatter,
               dt.broadcast, dt.broadcast_, dt.allgather, dt.alltoall):
        params = inspect.signature(inspect.unwrap(fn)).parameters
        kinds = {n: p.kind for n, p in params.items()}
        assert kinds["algorithm"] == kinds["group"] == inspect.Parameter.KEYWORD_ONLY, fn.__name__
        names = list(params)
        assert names.index("algorithm") < names.index("group"), fn.__name__
        assert params["algorithm"].default == "auto" and params["group"].default is None


def test_a_pmix_launch_of_the_mpich_wheel_is_explained_before_mpi_starts(monkeypatch):
    """Issue 17: MPICH's own "unsupported PMI version PMIx" told users nothing they could act on."""
    from disttrain import runtime

    monkeypatch.setenv("PMIX_RANK", "0")
    monkeypatch.delenv("PMI_RANK", raising=False)
    with pytest.raises(RuntimeError, match="PMIx launcher.*mpiexec"):
        runtime._check_launcher()
    monkeypatch.setenv("PMI_RANK", "0")  # launched by the MPICH wheel's own Hydra: fine
    runtime._check_launcher()


def test_compressors_and_data_parallel_use_only_comms_public_api():
    """Issue 17: compression reached into comm's private functions (api._allreduce, ring_allreduce,
    ALLGATHER.resolve(choose(...))); DataParallel into the engine and validation. Both now use the
    communicator-level public API, disttrain.comm.lowlevel."""
    import pathlib

    root = pathlib.Path(dt.__file__).parent
    private = ("comm.api import", "comm.registry import", "comm.costmodel import", "comm.ring import",
               "comm.engine import", "comm import config", "comm import validate", "_allreduce(")
    for f in [*root.glob("compression/*.py"), root / "parallel" / "data.py"]:
        src = f.read_text()
        assert not [p for p in private if p in src], (f.name, [p for p in private if p in src])


def test_every_compressor_has_one_compress_signature_and_one_algorithm_rule():
    import inspect

    from disttrain.compression import COMPRESSORS, make

    for name, cls in COMPRESSORS.items():
        assert list(inspect.signature(cls.compress).parameters) == ["self", "x", "key", "layout"], name
        assert list(inspect.signature(cls.reduce_).parameters) == ["self", "bucket", "comm", "algorithm"], name
    assert make("topk:0.1").check_algorithm("ring") and make("onebit").check_algorithm("tree")
    assert make("topk:0.1").check_algorithm("auto") is None and make("none").check_algorithm("tree") is None


# The library's layers, bottom first: a module may import its own layer and the ones below, never
# above (docs/ARCHITECTURE.md); the package root (the public API) sits just below the main job.
LAYERS = [{"errors", "log", "registry", "mpi"}, {"groups"}, {"faults", "flight", "timeline", "waitfor"}, {"stall"},
          {"comm"}, {"runtime"}, {"nn", "optim", "data", "compression", "numerics"}, {"parallel", "checkpoint"},
          {"zoo", "workloads"}, {"job", "train", "elastic"}]
# the only deferred imports, each documented where it is: mpi4py.MPI starts MPI (disttrain/mpi.py),
# pydoc_data is optional in some Python distributions (data/text.py)
DEFERRED = {("disttrain/mpi.py", "mpi4py"), ("disttrain/data/text.py", "pydoc_data.topics")}


def _library_imports():
    """({module: set of disttrain modules it imports at its top}, [(file, module) imported inside a function])."""
    import ast

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "disttrain")
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                m = os.path.relpath(p[:-3], os.path.dirname(root)).replace(os.sep, ".")
                files[m.removesuffix(".__init__")] = p

    def targets(mod, node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = mod if files[mod].endswith("__init__.py") else mod.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = node.module if node.level == 0 else (f"{base}.{node.module}" if node.module else base)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]

    edges, deferred = {}, []
    for m, p in files.items():
        with open(p) as fh:
            tree = ast.parse(fh.read())
        top = set()
        for node in tree.body:
            for n in (ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]):
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    top.update(t for t in targets(m, n) if t.split(".")[0] == "disttrain")
        edges[m] = top
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        name = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                        deferred.append((os.path.relpath(p, os.path.dirname(root)), name))
    return edges, deferred


def _layer(module: str) -> float:
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS) - 1.5  # the package root: the public API, used by the main job only
    return next(i for i, layer in enumerate(LAYERS) if parts[1] in layer)


def test_imports_point_down_form_no_circle_and_sit_at_the_top():
    edges, deferred = _library_imports()
    assert set(deferred) == DEFERRED, f"function-local imports outside the documented ones: {set(deferred) - DEFERRED}"
    up = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if _layer(t) > _layer(m))
    assert not up, f"modules importing a layer above their own: {up}"
    # no circle at all, package __init__ modules included (iterative DFS with colours)
    state = {}
    for start in edges:
        stack = [(start, iter(sorted(edges[start])))]
        state[start] = state.get(start, 0) or 1
        if state[start] == 2:
            continue
        while stack:
            v, it = stack[-1]
            w = next((w for w in it if w in edges), None)
            if w is None:
                state[v] = 2
                stack.pop()
            elif state.get(w, 0) == 1:
                raise AssertionError(f"import circle through {w}: {[s for s, _ in stack]}")
            elif state.get(w, 0) == 0:
                state[w] = 1
                stack.append((w, iter(sorted(edges[w]))))


def test_every_library_package_is_installed():
    """pyproject lists packages explicitly (so that `models/` installs only as disttrain_zoo): a new
    subpackage missing from that list works in an editable install and is absent from `pip install .`
    - the fresh-clone quickstart would fail on import."""
    import tomllib

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, here).replace(os.sep, ".") for d, _, fs in os.walk(os.path.join(here, "disttrain"))
             if "__init__.py" in fs}
    assert found <= listed, f"packages missing from pyproject.toml's [tool.setuptools] packages: {sorted(found - listed)}"
