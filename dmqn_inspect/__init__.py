"""Views of trained DMQN runs: the Textual inspector and the Plotly report."""
