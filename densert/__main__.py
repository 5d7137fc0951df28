import sys

from densert.cli import main

sys.exit(main())
