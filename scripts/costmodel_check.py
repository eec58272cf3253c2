"""Calibrate the cost model and print predicted vs measured allreduce times per algorithm and size.

    mpiexec -n 2 python scripts/costmodel_check.py --sizes 8,4K,64K,1M,4M,16M,64M --json results/costmodel_p2.json

Also saves the calibration to the per-user cache (~/.cache/disttrain/costmodel-pP.json), which
algorithm="auto" loads in later jobs of the same size.
"""
from disttrain.comm.costmodel import main

if __name__ == "__main__":
    main()
