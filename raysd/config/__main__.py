"""``python -m raysd.config --readme docs/configuration.md`` regenerates the reference section of docs/configuration.md."""

import sys

from raysd.config.reference import reference_markdown, write_readme_reference

if len(sys.argv) == 3 and sys.argv[1] == "--readme":
    changed = write_readme_reference(sys.argv[2])
    print(f"{sys.argv[2]}: configuration reference {'updated' if changed else 'already current'}")
else:
    print(reference_markdown())
