"""The widgets and screens of `dmqn inspect`, one per module."""
