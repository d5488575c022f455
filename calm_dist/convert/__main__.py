"""python -m calm_dist.convert {convert,inspect,diff} ..."""

import sys

from calm_dist.convert import main

sys.exit(main())
