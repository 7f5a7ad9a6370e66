"""``python -m SmartBiopsyLib.cli``: the same as the ``smartbiopsy`` command."""
import sys

from SmartBiopsyLib.cli.main import main

sys.exit(main())
