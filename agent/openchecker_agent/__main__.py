"""Allow `python -m openchecker_agent`, the same as `openchecker-agent`."""

import sys

from .cli import main

sys.exit(main())
