import sys

from ilup_controller.cli import main

sys.exit(main())
