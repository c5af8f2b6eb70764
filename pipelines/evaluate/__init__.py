"""``fvlm evaluate``: zero-shot evaluation of an exported model on a preprocessed cohort (issue 6)."""
