import sys

from agentpool.cli import main

sys.exit(main())
