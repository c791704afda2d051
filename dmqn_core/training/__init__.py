"""Training, evaluation, metrics, multi-process training and `dmqn bench`."""
