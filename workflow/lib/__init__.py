"""Shared helpers of the stage modules: the config, files, data sources, models, losses, the training step,
generation, judges and the report's statistics. A stage module (``workflow/<stage>.py``, run by one rule)
imports from here and never from another stage (``tests/test_layout.py``)."""
