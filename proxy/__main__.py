"""`python -m proxy` is `element-proxy`."""

import sys

from proxy.cli import main

sys.exit(main())
