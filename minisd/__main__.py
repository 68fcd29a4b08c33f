import sys

from minisd.cli import main

sys.exit(main())
