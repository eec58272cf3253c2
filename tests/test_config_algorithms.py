"""attack7: the main job's --algorithm / --alltoall-algorithm are checked with the configuration.

An unknown name, or a --shard mode with an --algorithm that cannot reduce-scatter, is a
configuration error (one message, exit 2).

`--shard gradients|full` (and `optimizer` without compression) reduce-scatter the gradients, which
only 'auto', 'ring', 'hier' and 'mpi' can; DataParallel refused the others only once the job had
built its model: a CollectiveError traceback from every rank and exit 1, not the main job's one
message and exit 2 (found by tests/fuzz_job.py: 4 of the first 15 random configurations).
"""
import pytest

from disttrain.job import ConfigError, parse_config


@pytest.mark.parametrize("shard,algorithm", [("gradients", "ps"), ("full", "butterfly"), ("optimizer", "tree")])
def test_a_shard_mode_with_an_algorithm_that_cannot_reduce_scatter_is_refused(shard, algorithm):
    with pytest.raises(ConfigError) as e:
        parse_config(["--shard", shard, "--algorithm", algorithm])
    assert f"--shard '{shard}' reduce-scatters the gradients; --algorithm must be 'auto' or one of" in str(e.value)


@pytest.mark.parametrize("flags", [["--shard", "full", "--algorithm", "ring"], ["--shard", "gradients"],
                                   ["--shard", "optimizer", "--compression", "fp16", "--algorithm", "ring"],
                                   ["--algorithm", "ps"]])
def test_the_shard_modes_accept_what_they_can_run(flags):
    parse_config(flags)


@pytest.mark.parametrize("flags,msg", [(["--algorithm", "bogus"], "--algorithm: unknown allreduce algorithm 'bogus'"),
                                       (["--algorithm", "bogus", "--sync", "local:2"], "unknown allreduce algorithm"),
                                       (["--algorithm", "bogus", "--sync", "ssp:1"], "unknown allreduce algorithm"),
                                       (["--model", "dlrm", "--alltoall-algorithm", "x"],
                                        "--alltoall-algorithm: unknown alltoall algorithm 'x'")])
def test_an_unknown_algorithm_is_a_configuration_error(flags, msg):
    """--algorithm was never checked with the configuration: a traceback and exit 1 from inside the
    run under --sync sync/local/hybrid (after the local steps), silently ignored under --sync ssp."""
    with pytest.raises(ConfigError) as e:
        parse_config(flags)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("algorithm", ["hier", "shm", "ring"])
def test_every_registered_algorithm_is_still_accepted(algorithm):
    parse_config(["--algorithm", algorithm])
