import sys

from kvmhooks.cli import main

sys.exit(main())
