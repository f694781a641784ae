import sys

from pipelines.cluster.cli import main

sys.exit(main())
