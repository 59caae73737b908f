"""Entry points: the stage-a command line (one module per subcommand in cli/commands/)."""

DEBUG = False
"""Set by --debug: errors are shown with their traceback (kept here: `python -m cli.main` runs main as __main__)."""
