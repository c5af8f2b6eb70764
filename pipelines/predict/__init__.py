"""``fvlm predict``: zero-shot predictions (and a token similarity map) for one CT scan."""
