"""``python -m disttrain.flight DIR``: read every rank's flight record and say what went wrong."""
import sys

from . import main

sys.exit(main())
