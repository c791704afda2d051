"""dmqn_core: the DMQN model, data preparation, training, evaluation and the run store.

This package never imports ``dmqn_cli`` or ``dmqn_inspect``.
"""

__version__ = "0.1.0"
