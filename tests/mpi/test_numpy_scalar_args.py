"""attack5: arguments given as NumPy scalars agree with the equal plain Python values.

validate._hash keys and hashes a call's fields by ``repr``: an op or algorithm given as ``np.str_``
(read from a NumPy array of options) hashes unlike the equal ``str``, and which spelling a process
cached first decides its hash. A valid program - every rank passing the same op - raised
CollectiveError ("arguments differ across ranks - " naming nothing) when one rank had made a call
with the plain str before (e.g. on a group the others are not in). Fixed: the hash is taken of
each value's plain spelling (validate._canon).
"""
import enum

import numpy as np
import pytest

import disttrain as dt


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "ring"])
def test_an_op_given_as_numpy_str_agrees_with_the_equal_str(comm, algorithm):
    r = comm.Get_rank()
    x = np.ones(3)
    ops = ["sum", np.str_("sum")]  # equal values, two spellings: odd ranks read theirs from an array
    y = dt.allreduce(x, op=ops[r % 2], algorithm=algorithm)
    np.testing.assert_array_equal(y, np.full(3, comm.Get_size()))
    y = dt.allreduce(x, op=np.str_("max") if r % 2 else "max", algorithm=algorithm)
    np.testing.assert_array_equal(y, x)


@pytest.mark.mpi
def test_a_root_given_as_numpy_int_agrees_with_the_equal_int(comm):
    r = comm.Get_rank()
    x = np.arange(4.0) if r == 0 else np.zeros(4)
    y = dt.broadcast(x, root=0 if r % 2 == 0 else np.int64(0))     # even ranks cache the int first
    np.testing.assert_array_equal(y, np.arange(4.0))
    x = np.arange(4.0) if r == 0 else np.zeros(4)
    y = dt.broadcast(x, root=np.int64(0) if r % 2 == 0 else 0)
    np.testing.assert_array_equal(y, np.arange(4.0))


class Op(str, enum.Enum):
    """Ops as str-valued enum members (equal to, and hashing like, their plain strs)."""
    MAX = "max"
    PROD = "prod"


@pytest.mark.mpi
def test_an_op_given_as_a_str_enum_member_agrees_with_the_equal_str(comm):
    """review6: _canon spelled a str subclass as str(v), which is 'Op.SUM' for a (str, Enum) member
    (Python 3.11) - equal to 'sum', accepted as the op, yet hashed unlike it: 'arguments differ'."""
    r = comm.Get_rank()
    x = np.full(3, 2.0)
    for op in Op:  # neither op made a call before (init's warm-up cached 'sum' everywhere)
        for mine in ((op, op.value), (op.value, op)):  # even ranks spell it first one way, odd ones the other
            for algorithm in ("auto", "ring"):
                y = dt.allreduce(x, op=mine[r % 2], algorithm=algorithm)
                np.testing.assert_array_equal(y, x if op is Op.MAX else x ** comm.Get_size())
