import sys

from beamkin.cli import main

sys.exit(main())
