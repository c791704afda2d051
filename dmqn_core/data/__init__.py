"""Data preparation: synthetic logs, source formats, `dmqn prep`, prepared sets and the batches read from them."""
