"""dmqn_cli: the ``dmqn`` command line. Commands parse, call dmqn_core, and print."""
