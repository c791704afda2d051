"""Cached user states: their byte layout, the embedded and Redis stores, export and CachedScorer."""
