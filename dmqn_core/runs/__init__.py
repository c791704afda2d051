"""The run store and what reads a run back: checkpoints, the Run handle, codebook inspection."""
