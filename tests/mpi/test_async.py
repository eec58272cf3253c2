"""allreduce_async: several outstanding handles, progress while the caller does not call into
disttrain, concurrency with blocking collectives, errors delivered through wait()."""
import time

import numpy as np
import pytest

import disttrain as dt
from disttrain.comm.engine import Handle


@pytest.mark.mpi
def test_several_outstanding_handles_waited_in_any_order(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    specs = [(np.float32, 10, "ring"), (np.int64, 100003, "rabenseifner"), (np.float16, 3, "tree"),
             (np.float64, 0, "butterfly"), (np.int32, 4097, "double_tree"), (np.float32, 999, "ps"),
             (np.float64, 65536, "mpi"), (np.float32, 5, "auto")]
    xs = [np.full(n, r + 1, dt_) for dt_, n, _ in specs]
    handles = [dt.allreduce_async(x, algorithm=a) for x, (_, _, a) in zip(xs, specs)]
    for x in xs:
        x[...] = -7  # the async copy was taken at submission: the caller may reuse its array
    assert all(isinstance(h, Handle) for h in handles)
    for h, (dtype, n, _) in reversed(list(zip(handles, specs))):
        out = h.wait()
        assert out.dtype == dtype and np.array_equal(out, np.full(n, p * (p + 1) // 2, dtype))
        assert h.test()


@pytest.mark.mpi
def test_in_place_async(comm):
    p = comm.Get_size()
    x = np.ones(50000, np.float32)
    h = dt.allreduce_async_(x, op="avg", algorithm="ring")
    assert h.wait() is x and np.all(x == 1.0)
    y = np.arange(10, dtype=np.int64)
    assert np.array_equal(dt.allreduce_async_(y, op="max").wait(), np.arange(10))
    assert p >= 1


@pytest.mark.mpi
def test_progresses_while_caller_computes(comm):
    """No wait()/test() call drives it: only the communication thread can finish the reduction."""
    p = comm.Get_size()
    x = np.ones(1 << 20, np.float32)  # 4 MiB
    comm.Barrier()
    h = dt.allreduce_async(x, algorithm="ring")
    deadline = time.monotonic() + 60
    a = np.random.default_rng(0).standard_normal((256, 256))
    while time.monotonic() < deadline and not h._done.is_set():  # peek without test()/wait()
        a = a @ a.T / 256.0  # BLAS releases the GIL: this is "the caller computing"
        time.sleep(0.01)
    done_before_wait = h._done.is_set()
    assert done_before_wait, "the async allreduce made no progress while the caller computed"
    assert np.all(h.wait() == p)


@pytest.mark.mpi
def test_blocking_collectives_while_async_in_flight(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    big = [dt.allreduce_async(np.full(200000, r, np.float64), algorithm="ring") for _ in range(3)]
    for i in range(20):  # blocking traffic on the main thread, concurrently with the comm thread
        assert dt.allreduce(np.array([i + r]), algorithm="butterfly")[0] == p * i + p * (p - 1) // 2
    assert dt.broadcast(np.array([r]), root=p - 1)[0] == p - 1
    for h in big:
        assert np.all(h.wait() == p * (p - 1) / 2)


@pytest.mark.mpi(min_size=2)
def test_errors_arrive_through_wait_on_every_rank(comm):
    r = comm.Get_rank()
    h = dt.allreduce_async(np.ones(4 if r == 0 else 5, np.float32))
    with pytest.raises(dt.CollectiveError, match="shape"):
        h.wait()
    assert h.test()
    ok = dt.allreduce_async(np.ones(3, np.float32)).wait()  # the engine survives the error
    assert np.all(ok == comm.Get_size())
