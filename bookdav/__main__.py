"""`python -m bookdav` is the `bookdav` command."""

import sys

from bookdav.cli import main

sys.exit(main())
