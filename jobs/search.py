"""`ray job submit` entrypoint for `raysd search` (it forwards its arguments; see jobs/README.md).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/search.py --help
"""

import sys

from raysd.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
