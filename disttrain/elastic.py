"""Elastic restarts: what ``launchers/elastic.sh`` asks of the main job, answered by the job's own code.

    python -m disttrain.elastic plan ARGS...          # the main job's flags (as given to disttrain.train)
    4 0 /data/ckpt                                    # -> ranks granule (pp * tp), explicit --dp (0: none), --checkpoint-dir
    python -m disttrain.elastic newest-step DIR       # -> the newest valid checkpoint's step, or "none"

The launcher is plain bash; these two questions are not: the configuration is parsed by the job's
own parser (flags and ``--config`` files alike, the same errors), and "valid" means what resume
means by it (``checkpoint.newest_valid``: every entry and file matches its checksum) - so the step the
launcher announces in its restart line is the step the job resumes from. Exit status 2 with the
job's message for a configuration the job would refuse.
"""
from __future__ import annotations

import sys

from . import checkpoint
from .job.config import ConfigError, parse_config


def plan(argv) -> tuple[int, int, str]:
    """(granule, dp, checkpoint_dir) of the main job run with `argv`: world sizes must be multiples
    of granule = pp * tp (the mesh is dp x pp x tp); dp is the explicit --dp (0: the job picks
    world / granule). Raises ConfigError as the job would."""
    cfg = parse_config(argv)
    return cfg.pp * cfg.tp, cfg.dp, cfg.checkpoint_dir


def newest_step(directory: str, warn=None) -> int | None:
    """The step of the newest checkpoint in `directory` that resume would load; None if none."""
    path, rec = checkpoint.newest_valid(directory, warn=warn or (lambda m: print(m, file=sys.stderr)))
    return int(rec["step"]) if path else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        try:
            granule, dp, ckpt = plan(argv[1:])
        except ConfigError as e:
            print(f"configuration error: {e}", file=sys.stderr)
            return 2
        print(granule, dp, ckpt)
        return 0
    if argv[:1] == ["newest-step"] and len(argv) == 2:
        step = newest_step(argv[1])
        print("none" if step is None else step)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main())
