"""The ``smartbiopsy`` command: argument parsing and printing only (one cmd_<name> module per subcommand).
Nothing outside this package imports it; a command module never imports another command module."""
from SmartBiopsyLib.cli.main import main  # noqa: F401  (the console-script entry point)
