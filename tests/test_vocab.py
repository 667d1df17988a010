from captioner.vocab import SPECIALS, Vocabulary, percentile, tokenize


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A dog, running. It's BIG!") == ["a", "dog", "running", "it's", "big"]
    assert tokenize("A dog, running.", keep_punctuation=True) == ["a", "dog", ",", "running", "."]


def test_build_counts_threshold_and_is_deterministic():
    captions = ["a dog runs", "a dog sits", "a cat runs", "the cat"]
    v1 = Vocabulary.build(captions, min_count=2)
    v2 = Vocabulary.build(list(reversed(captions)), min_count=2)
    assert v1.words == v2.words
    assert v1.words[:4] == list(SPECIALS)
    assert v1.words[4:] == ["a", "cat", "dog", "runs"]  # by count, ties alphabetical; "sits", "the" dropped


def test_encode_decode_round_trip_with_unknown_words_and_truncation():
    v = Vocabulary.build(["a dog runs on grass"] * 3, min_count=1)
    ids = v.encode("A dog flies")
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == "a dog <unk>"
    assert len(v.encode("a dog runs on grass a dog", max_length=3)) == 5


def test_max_length_from_percentile():
    captions = ["w " * n for n in range(1, 101)]
    assert Vocabulary.build(captions, min_count=1, length_percentile=95).max_length == 95
    assert percentile([5, 1, 3], 50) == 3


def test_save_load(tmp_path):
    v = Vocabulary.build(["a b c", "a b"], min_count=1)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w.words == v.words and w.max_length == v.max_length
