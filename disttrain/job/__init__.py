"""The main job (``python -m disttrain.train``), split by concern: configuration (config.py), set-up
of the mesh, workload, model, optimizer (setup.py), checkpoints and resume (resume.py), metrics
(metrics.py) and the loop (loop.py)."""
from .config import ConfigError, TrainConfig, make_parser, parse_config
from .loop import main
from .metrics import Interval, comm_fields, comm_summary
from .resume import truncate_metrics

__all__ = ["ConfigError", "TrainConfig", "make_parser", "parse_config", "main", "Interval", "comm_fields",
           "comm_summary", "truncate_metrics"]
