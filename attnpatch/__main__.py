import sys

from attnpatch.cli import main

sys.exit(main())
