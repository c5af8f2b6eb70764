"""The main job end to end (``fvlm demo``) and the quality benchmark built on it."""
