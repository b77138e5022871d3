"""`ray job submit` entrypoint: write a dataset's canonical Parquet splits.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/prepare.py --dataset retinamnist --data-dir /data --out /shared/runs/retina/data

The job runs the same code as `raysd prepare` (it only forwards its arguments).
"""

import sys

from raysd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
