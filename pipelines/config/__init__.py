"""Configuration read by more than one command: the training recipe (``recipe``), which evaluation, prediction
and the demo read from a run's ``config.yaml``."""
