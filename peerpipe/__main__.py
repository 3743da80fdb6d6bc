import sys

from peerpipe.cli.main import main

sys.exit(main())
