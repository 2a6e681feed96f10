"""Neural models: encoder, attention, decoder and the encoder-decoder (imports only torch)."""

from seq2seq.models.attention import Attention
from seq2seq.models.decoder import Decoder, State
from seq2seq.models.encoder import Encoder
from seq2seq.models.seq2seq import PAD, EncoderOutput, Seq2Seq, build_model

__all__ = ["PAD", "Attention", "Decoder", "Encoder", "EncoderOutput", "Seq2Seq", "State",
           "build_model"]
