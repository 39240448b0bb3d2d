"""common.data: the embedded corpus, the cached BPE tokenizer, the split and the batches."""

import json
import math

import pytest
import torch

from common import data as D

SMALL_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox number {i} jumps over {i % 7} lazy dogs, naïvely. " * 3
    for i in range(400)
)


@pytest.fixture(scope="module")
def corpus():
    return D.load_corpus()


@pytest.fixture()
def small_tok(tmp_path):
    return D.get_tokenizer(300, text=SMALL_TEXT, cache=tmp_path)


def test_default_corpus_is_real_english_and_deterministic(corpus):
    assert len(corpus) > 500_000
    assert corpus == D._default_corpus.__wrapped__()  # rebuilt from scratch: the same text
    words = corpus.split()
    common_words = sum(w.lower() in {"the", "of", "a", "is", "to", "and", "in"} for w in words)
    assert common_words / len(words) > 0.08  # prose, not code or noise


def test_load_corpus_from_path(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Some text.\n\nMore text.", encoding="utf-8")
    assert D.load_corpus(path) == "Some text.\n\nMore text."
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        D.load_corpus(tmp_path / "empty.txt")


def test_bad_corpus_files_are_one_line_errors_naming_the_file(tmp_path):
    from common.errors import UsageError

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases = {
        "missing.txt": "corpus file {} : no such file".replace(" :", ":"),
        ".": "corpus file {} is a folder, not a text file",
        "empty.txt": "corpus file {} is empty",
        "binary.bin": "corpus file {} is binary (it holds NUL bytes), not UTF-8 text",
        "latin1.txt": "corpus file {} is not UTF-8 text (byte 3: invalid continuation byte)",
    }
    for name, message in cases.items():
        path = tmp_path / name if name != "." else tmp_path
        with pytest.raises(UsageError) as e:
            D.load_corpus(path)
        assert str(e.value) == message.format(path)


def test_a_long_text_without_blank_lines_is_split_by_size():
    line = "a line of a long text file without any blank line between its lines\n"
    text = line * (400_000 // len(line))  # about 400 KB, one paragraph
    train, val = D.split_text(text)
    assert len(val) >= 9 and len(train) >= 80
    assert all(len(c) <= 4096 for c in train + val)
    assert "".join(c for c in D._cut_by_size(text, 4096)) == text  # nothing lost
    assert all(c.endswith("between its lines\n") for c in train[:-1])  # cut at line breaks


def test_tokenizer_round_trip_and_byte_counts(small_tok):
    for s in ["Hello, world!", "naïve café — ✓ 日本語 \t tabs\n\nnewlines", SMALL_TEXT[:3000]]:
        ids = small_tok.encode(s).ids
        assert small_tok.decode(ids) == s
        # token_bytes says how many bytes each token encodes: they must add up to the text's bytes
        assert D.token_byte_lengths(small_tok)[ids].sum().item() == len(s.encode("utf-8"))
    assert small_tok.get_vocab_size() == 300
    assert D.token_byte_lengths(small_tok)[small_tok.token_to_id(D.EOT)] == 0


def test_tokenizer_cache_loads_and_corrupt_cache_is_retrained(tmp_path, monkeypatch):
    calls = []
    real_train = D.train_tokenizer
    monkeypatch.setattr(D, "train_tokenizer", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    first = D.get_tokenizer(300, text=SMALL_TEXT, cache=tmp_path)
    files = list(tmp_path.glob("tokenizer-*-300.json"))
    assert len(calls) == 1 and len(files) == 1
    second = D.get_tokenizer(300, text=SMALL_TEXT, cache=tmp_path)
    assert len(calls) == 1  # loaded, not retrained
    assert second.to_str() == first.to_str()

    D.get_tokenizer(320, text=SMALL_TEXT, cache=tmp_path)  # another vocab size: another file
    assert len(calls) == 2

    body = files[0].read_bytes()
    record = json.loads(body)
    record["tokenizer"] = record["tokenizer"].replace("a", "b", 1)  # valid JSON, edited content
    tampered = json.dumps(record).encode()
    for corrupt in (body[: len(body) // 2], tampered, b""):
        files[0].write_bytes(corrupt)
        again = D.get_tokenizer(300, text=SMALL_TEXT, cache=tmp_path)
        assert again.to_str() == first.to_str()
        assert files[0].read_bytes() == body  # rewritten whole
    assert len(calls) == 5
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(["abc"], 100)


def test_split_is_deterministic_and_disjoint(corpus):
    train, val = D.split_text(corpus)
    train2, val2 = D.split_text(corpus)
    assert train == train2 and val == val2
    assert set(train).isdisjoint(val)
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    # nothing lost: every paragraph lands in exactly one split
    assert sum(len(c) for c in train + val) + 2 * (len(train) + len(val) - 1) == len(corpus)
    with pytest.raises(ValueError, match="val_fraction"):
        D.split_text(corpus, val_fraction=0.7)
    with pytest.raises(ValueError, match="too short"):
        D.split_text("one paragraph only")


def test_batches_shapes_and_shift(small_tok):
    data = D.TokenData.from_text(SMALL_TEXT, small_tok, context_length=16)
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch("train", 5, generator=g)
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    # every row is a real window of the training stream, continued by y's last token
    stream = data.train.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        starts = [i for i in range(len(stream) - 16) if stream[i : i + 16] == row_x]
        assert any(stream[s + 16] == row_y[-1] for s in starts)
    # same generator state -> same batch; rows slice the same global batch (data parallel)
    x2, _ = data.get_batch("train", 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x3, _ = data.get_batch("train", 5, generator=torch.Generator().manual_seed(0), rows=slice(2, 4))
    assert torch.equal(x3, x[2:4])


def test_val_batches_fixed_order_cover_stream(small_tok):
    data = D.TokenData.from_text(SMALL_TEXT, small_tok, context_length=16)
    batches = list(data.val_batches(4))
    assert [torch.equal(a[0], b[0]) for a, b in zip(batches, data.val_batches(4))] == [True] * len(batches)
    xs = torch.cat([x for x, _ in batches]).flatten()
    n = (len(data.val) - 1) // 16 * 16
    assert torch.equal(xs, data.val[:n])
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), data.val[1 : n + 1])
    assert len(list(data.val_batches(4, max_batches=2))) == 2


def test_bytes_per_token(small_tok):
    data = D.TokenData.from_text(SMALL_TEXT, small_tok, context_length=16)
    train_chunks, val_chunks = D.split_text(SMALL_TEXT)
    val_bytes = sum(len(c.encode("utf-8")) for c in val_chunks)
    assert math.isclose(data.bytes_per_token["val"], val_bytes / len(data.val))
    with pytest.raises(ValueError, match="split"):
        data.tokens("test")


def test_bits_per_byte_hand_calculation():
    # 10 tokens predicted uniformly over 16 symbols: 10 * ln 16 nats; they encode 20 bytes.
    # Each token costs log2(16) = 4 bits, spread over 2 bytes: 2 bits per byte.
    assert math.isclose(D.bits_per_byte(10 * math.log(16), 20), 2.0)
    with pytest.raises(ValueError):
        D.bits_per_byte(1.0, 0)


def test_context_too_long_is_rejected(small_tok):
    with pytest.raises(ValueError, match="context_length"):
        D.TokenData.from_text(SMALL_TEXT, small_tok, context_length=10**6)
