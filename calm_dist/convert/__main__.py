"""python -m calm_dist.convert {convert,inspect,diff,verify} ..."""

import sys

from calm_dist.convert import main

if __name__ == "__main__":  # a spawned child process re-imports __main__: it must not convert again
    sys.exit(main())
