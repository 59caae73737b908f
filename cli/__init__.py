"""Entry points: the stage-a command line and the local (broker-less) orchestration of `stage-a run`."""

DEBUG = False
"""Set by --debug: errors are shown with their traceback (kept here: `python -m cli.main` runs main as __main__)."""
