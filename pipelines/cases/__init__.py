"""The cases of an ``fvlm preprocess`` output: the format (writer and readers, ``format``), the model's view of a
case (``view``, one function shared by training, evaluation and ``fvlm predict``), the dataset of samples
(``dataset``) and the resumable training loader (``loader``)."""
