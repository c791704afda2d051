"""Building blocks every model shares: embeddings, the MLP head, sequence helpers, target attention,
the InterestModel skeleton."""
