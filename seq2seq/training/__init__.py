"""Training a model from a recipe, one file per question.

- :mod:`~seq2seq.training.trainer`: the story of a run (set up, resume, epochs, validate, stop).
- :mod:`~seq2seq.training.step`: what one update does (forward, loss, backward, clipping,
  optimizer, precision), eager or replayed as CUDA graphs (:mod:`~seq2seq.training.graphs`).
- :mod:`~seq2seq.training.optim`: the optimizer and the learning-rate schedule.
- :mod:`~seq2seq.training.progress`: where a run is (the counters a checkpoint restores).
- :mod:`~seq2seq.training.validation`: validation loss, perplexity and BLEU during training.
- :mod:`~seq2seq.training.run_dir`: what a run leaves on disk, what a resume may change, and
  how a run ended.
"""
