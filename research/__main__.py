import sys

from .eval import main

sys.exit(main())
