"""Entry points: the stage-a command line and the local (broker-less) orchestration of `stage-a run`."""
