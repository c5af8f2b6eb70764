"""What ``fvlm evaluate``, ``fvlm predict`` and the downstream commands share to run a trained model: loading
the export and the run's view (``model``), the windows around each anatomy (``windows``) and the recipe's
zero-shot scorer (``scoring``)."""
