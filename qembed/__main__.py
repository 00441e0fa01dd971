import sys

from qembed.cli import main

sys.exit(main())
