"""The models of Tables 2 and 3: one module per baseline, DMQN in models/dmqn/, and the registry that
builds them by name."""
