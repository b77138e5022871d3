"""`ray job submit` entrypoint for `raysd finetune` (it forwards its arguments; see jobs/README.md).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --help
"""

import sys

from raysd.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
