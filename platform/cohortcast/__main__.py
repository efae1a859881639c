import sys

from cohortcast.cli import main

sys.exit(main())
