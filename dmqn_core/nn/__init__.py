"""Building blocks every model shares: embeddings, the MLP head, sequence helpers, target attention;
the model contract (InterestModel), the sequence models' shared parts (SequenceModel) and the baselines'
skeleton (HistoryModel)."""
