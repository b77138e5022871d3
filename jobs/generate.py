"""`ray job submit` entrypoint for `raysd generate` (it forwards its arguments; see jobs/README.md).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/generate.py --help
"""

import sys

from raysd.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
