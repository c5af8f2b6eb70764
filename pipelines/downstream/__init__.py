"""Downstream evaluations of a pre-trained model: embedding export (``fvlm embed``), label-efficient linear
probing (``fvlm probe``) and image <-> report retrieval (``fvlm retrieve``)."""
