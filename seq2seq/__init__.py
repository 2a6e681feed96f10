"""seq2seq: recurrent neural machine translation."""

__version__ = "0.1.0"
