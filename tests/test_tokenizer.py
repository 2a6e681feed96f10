"""SentencePiece tokenizer: round trips, fixed special ids, reuse by hash, checkpoint state."""

import io
import pickle
import random

import pytest
import torch

from seq2seq.config import TokenizerConfig
from seq2seq.errors import Seq2SeqError
from seq2seq.tokenizer import (
    BOS,
    EOS,
    PAD,
    THREADED_BATCH,
    UNK,
    Tokenizer,
    load_or_train,
    tokenizer_hash,
    train_tokenizer,
)

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"]


def sentences(n: int, seed: int) -> list[str]:
    """Normalised text (lowercase words, single spaces) from a small alphabet."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(150)]
    return [" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return list(zip(sentences(300, 1), [s.upper() for s in sentences(300, 2)]))


def config(**changes) -> TokenizerConfig:
    settings = {"vocab_size": 64, "input_sentence_size": 0}
    settings.update(changes)
    return TokenizerConfig(**settings)


@pytest.fixture(scope="module", params=[("unigram", True), ("unigram", False), ("bpe", True),
                                        ("bpe", False)], ids=lambda p: f"{p[0]}-joint{p[1]}")
def trained(request, pairs, tmp_path_factory) -> Tokenizer:
    model_type, joint = request.param
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(config(type=model_type, joint=joint), pairs, out)


def test_round_trip_of_normalised_text(trained, pairs):
    held_out = sentences(50, 3)  # unseen sentences of known characters
    src = [s for s, _ in pairs] + held_out
    trg = [t for _, t in pairs] + [s.upper() for s in held_out]
    assert trained.decode_src(trained.encode_src(src)) == src
    assert trained.decode_trg(trained.encode_trg(trg)) == trg


def test_short_lists_encode_and_decode_as_the_batch_calls_do(trained, pairs):
    # Lists shorter than THREADED_BATCH go one sentence at a time: the same ids and text.
    src = [s for s, _ in pairs] + ["", " ", "ka ✓ lo"]
    assert len(src) >= THREADED_BATCH
    ids = trained.encode_src(src)
    assert [trained.encode_src([s])[0] for s in src] == ids
    assert trained.encode_src(src[:3]) == ids[:3]
    assert trained.encode_src([]) == []
    text = trained.decode_src(ids)
    assert [trained.decode_src([row])[0] for row in ids] == text
    assert trained.decode_src(ids[-5:]) == text[-5:]
    assert trained.decode_trg([[], [BOS, EOS]]) == ["", ""]


def test_special_ids_are_fixed(trained, pairs):
    for pieces in (trained.src_pieces([PAD, UNK, BOS, EOS]),
                   trained.trg_pieces([PAD, UNK, BOS, EOS])):
        assert pieces == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = trained.encode_src([s for s, _ in pairs])
    assert all(PAD not in row and BOS not in row and EOS not in row for row in ids)
    assert UNK in trained.encode_src(["ka ✓ lo"])[0]  # a character never seen in training


def test_decode_ignores_pad_bos_eos(trained):
    text = "kalo mine"
    ids = trained.encode_trg([text.upper()])[0]
    assert trained.decode_trg([[BOS] + ids + [EOS, PAD, PAD]]) == [text.upper()]
    assert trained.decode_src([[BOS] + trained.encode_src([text])[0] + [EOS]]) == [text]


def test_decoded_output_has_no_extra_spaces(trained):
    # A model may emit the lone word-start piece at either end or twice in a row (an output
    # cut at the length limit ends in it); the text never has spaces SentencePiece removes.
    space = trained._trg.piece_to_id("▁")
    assert trained.trg_pieces([space]) == ["▁"]
    ids = trained.encode_trg(["KALO MINE"])[0]
    assert trained.decode_trg([[space] + ids + [space, space] + ids + [space],
                               ids + [space], [space, space]]) == [
        "KALO MINE KALO MINE", "KALO MINE", ""]


def test_joint_and_vocab_sizes(trained):
    assert trained.src_vocab_size == 64 and trained.trg_vocab_size == 64
    if trained.joint:
        # One model: the same text gets the same ids on either side.
        assert trained.encode_src(["KALO mine"]) == trained.encode_trg(["KALO mine"])


def test_state_round_trip_through_weights_only_torch_load(trained):
    buffer = io.BytesIO()
    torch.save({"tokenizer": trained.to_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["tokenizer"]
    assert all(t.dtype == torch.uint8 for t in state.values())
    restored = Tokenizer.from_state(state)
    assert restored.joint == trained.joint
    assert restored.fingerprint == trained.fingerprint
    text = ["kalo mine suta", "ribapo"]
    assert restored.encode_src(text) == trained.encode_src(text)
    assert restored.encode_trg(text) == trained.encode_trg(text)


def test_pickle_and_load_from_directory(trained, tmp_path):
    assert pickle.loads(pickle.dumps(trained)).fingerprint == trained.fingerprint
    trained.save(tmp_path)
    assert Tokenizer.load(tmp_path).fingerprint == trained.fingerprint
    expected = {"spm.model"} if trained.joint else {"src.model", "trg.model"}
    assert {p.name for p in tmp_path.iterdir()} == expected


def test_reused_when_unchanged_retrained_when_anything_changes(pairs, tmp_path):
    out = tmp_path / "tokenizer"
    calls = []

    def stream():
        calls.append(1)
        return iter(pairs)

    first, reused = load_or_train(config(), stream, "data-1", "src", "trg", out)
    assert not reused and len(calls) == 1
    again, reused = load_or_train(config(), stream, "data-1", "src", "trg", out)
    assert reused and len(calls) == 1  # the corpus was not even read
    assert again.fingerprint == first.fingerprint
    changes = [(config(vocab_size=60), "data-1", "src"),  # settings
               (config(type="bpe"), "data-1", "src"),
               (config(), "data-2", "src"),  # training data
               (config(), "data-1", "xx")]  # languages
    for cfg, data_hash, src_lang in changes:
        _, reused = load_or_train(cfg, stream, data_hash, src_lang, "trg", out)
        assert not reused
        _, reused = load_or_train(cfg, stream, data_hash, src_lang, "trg", out)
        assert reused
    assert len(calls) == 1 + len(changes)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_vocabulary_too_large_names_the_key_and_the_limit(pairs, tmp_path):
    with pytest.raises(Seq2SeqError, match=r"tokenizer\.vocab_size = 5000 .* at most \d+"):
        train_tokenizer(config(vocab_size=5000), pairs, tmp_path / "tok")
    with pytest.raises(Seq2SeqError, match=r"tokenizer\.vocab_size = 10 "):
        train_tokenizer(config(vocab_size=10), pairs, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()  # nothing half-written
    assert not list(tmp_path.iterdir())


def test_separate_vocabularies_name_the_side_that_does_not_fit(pairs, tmp_path):
    """With tokenizer.joint=false the message gave the source's limit, then the target's."""
    uneven = [(s, t + " " + "".join(chr(0x4E00 + i) for i in range(30))) for s, t in pairs]
    with pytest.raises(Seq2SeqError, match=r"= 40 is smaller than the \d+ characters and special "
                                           r"tokens of the target training data"):
        train_tokenizer(config(joint=False, vocab_size=40), uneven, tmp_path / "tok")
    with pytest.raises(Seq2SeqError, match=r"too large for the source training data"):
        train_tokenizer(config(joint=False, vocab_size=5000), pairs, tmp_path / "tok")


def test_a_corpus_of_only_over_long_lines_says_so(tmp_path):
    """SentencePiece skips lines over 16,384 bytes: its own message was an internal check."""
    long = [("ka " * 6000, "lo " * 6000)] * 3
    with pytest.raises(Seq2SeqError, match=r"^the training data has no sentence shorter than "
                                           r"16,384 bytes"):
        train_tokenizer(config(), long, tmp_path / "tok")


def test_byte_fallback_spells_unseen_characters_and_gives_them_back(pairs, tmp_path):
    """Without it a character outside the vocabulary is the unknown piece (a ⁇ in output)."""
    unseen = "ka Āā ☃ €"
    plain = train_tokenizer(config(vocab_size=64), pairs, tmp_path / "plain")
    assert UNK in plain.encode_src([unseen])[0]
    assert plain.decode_src(plain.encode_src([unseen])) == ["ka ⁇ ⁇ ⁇"]
    byte = train_tokenizer(config(vocab_size=330, byte_fallback=True), pairs, tmp_path / "b")
    ids = byte.encode_src([unseen])[0]
    assert UNK not in ids and byte.decode_src([ids]) == [unseen]


def test_the_normalization_rule_is_the_recipe_s(pairs, tmp_path):
    """nmt_nfkc (the default) writes ² as 2 and ﬁ as fi; identity keeps the text."""
    text = pairs + [("m² ﬁ Ｔ", "m² ﬁ Ｔ")] * 20
    nfkc = train_tokenizer(config(vocab_size=70), text, tmp_path / "nfkc")
    assert nfkc.decode_src(nfkc.encode_src(["m² ﬁ Ｔ"])) == ["m2 fi T"]
    same = train_tokenizer(config(vocab_size=70, normalization="identity"), text, tmp_path / "i")
    assert same.decode_src(same.encode_src(["m² ﬁ Ｔ"])) == ["m² ﬁ Ｔ"]


def test_tokenizers_saved_before_the_new_keys_stay_current():
    """byte_fallback and normalization at their defaults leave the hash as it was."""
    import dataclasses
    import hashlib
    import json

    import sentencepiece as spm

    settings = dataclasses.asdict(config())
    del settings["byte_fallback"], settings["normalization"]
    key = {"data": "d", "settings": settings, "languages": ["de", "en"],
           "ids": [PAD, UNK, BOS, EOS], "sentencepiece": spm.__version__}
    before = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    assert tokenizer_hash(config(), "d", "de", "en") == before
    assert tokenizer_hash(config(byte_fallback=True), "d", "de", "en") != before
    assert tokenizer_hash(config(normalization="identity"), "d", "de", "en") != before


def test_training_sample_is_deterministic(pairs, tmp_path):
    cfg = config(input_sentence_size=200)  # joint: 600 sentences, SentencePiece samples 200
    one = train_tokenizer(cfg, pairs, tmp_path / "a")
    two = train_tokenizer(cfg, pairs, tmp_path / "b")
    assert one.fingerprint == two.fingerprint


def test_the_tokenizer_s_training_text_keeps_a_lone_carriage_return_inside_its_sentence(
        tmp_path):
    """The corpus reader takes a lone \\r for content; reading the training text back in
    Python's text mode split the sentence there."""
    from seq2seq.tokenizer import _lines, _write_training_text

    paths = _write_training_text([("left\rright", "x"), ("a\r\nb", "y")], tmp_path)
    assert list(_lines(list(paths))) == ["left\rright", "a\r b", "x", "y"]
