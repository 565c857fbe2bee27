"""runtime/data.py: every format reads, windows are packed and shuffled by seed, a resumed run replays exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from planner.errors import UserError
from runtime.data import TokenData

SEQ = 8
WIDTH = SEQ + 1


def _stream(n: int, high: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, n)


def _windows(stream: np.ndarray) -> set[tuple[int, ...]]:
    usable = len(stream) // WIDTH * WIDTH
    return {tuple(w) for w in stream[:usable].reshape(-1, WIDTH).tolist()}


def _epoch_rows(data: TokenData) -> list[tuple[int, ...]]:
    tokens, labels = data.next_batch(data.n_windows)
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
    return [tuple(r) for r in torch.cat([tokens, labels[:, -1:]], dim=1).tolist()]


@pytest.mark.parametrize("kind", ["u16", "u32-name", "u32-dtype", "npy", "text"])
def test_every_format_reads_its_windows(tmp_path, kind):
    high = {"u16": 60000, "npy": 1 << 20, "text": 128}.get(kind, 1 << 30)  # text: ASCII, valid UTF-8
    stream = _stream(20 * WIDTH + 5, high)  # 5 trailing tokens do not fill a window and are never served
    dtype = None
    if kind == "u16":
        path = tmp_path / "d.bin"
        stream.astype("<u2").tofile(path)
    elif kind == "u32-name":
        path = tmp_path / "d.u32.bin"
        stream.astype("<u4").tofile(path)
    elif kind == "u32-dtype":
        path, dtype = tmp_path / "d.bin", "uint32"
        stream.astype("<u4").tofile(path)
    elif kind == "npy":
        path = tmp_path / "d.npy"
        np.save(path, stream.astype(np.int32))
    else:
        path = tmp_path / "d.txt"
        path.write_bytes(stream.astype(np.uint8).tobytes())
    data = TokenData.open(str(path), seq_len=SEQ, seed=3, dtype=dtype)
    assert data.n_windows == 20
    assert data.max_token() == int(stream.max())
    if kind in ("u16", "u32-name", "u32-dtype", "text"):
        assert isinstance(data.tokens, np.memmap)  # never read whole
    rows = _epoch_rows(data)
    tokens, _ = data.next_batch(1)
    assert tokens.dtype == torch.int64 and tokens.shape == (1, SEQ)
    assert sorted(rows) == sorted(_windows(stream))  # one epoch = every window exactly once


def test_text_with_a_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat dog " * 9, encoding="utf-8")
    data = TokenData.open(str(text), seq_len=SEQ, seed=0, tokenizer_dir=str(tmp_path / "tok"))
    assert data.vocab == 6
    assert data.tokens[:7].tolist() == [1, 2, 3, 4, 1, 5, 0]
    assert data.n_windows == 63 // WIDTH
    data.check_vocab(6)
    with pytest.raises(UserError, match="corpus.txt"):
        data.check_vocab(5)


def test_order_depends_on_seed_and_epoch(tmp_path):
    path = tmp_path / "d.bin"
    _stream(50 * WIDTH, 1000).astype("<u2").tofile(path)
    a = TokenData.open(str(path), seq_len=SEQ, seed=1)
    b = TokenData.open(str(path), seq_len=SEQ, seed=1)
    c = TokenData.open(str(path), seq_len=SEQ, seed=2)
    first = _epoch_rows(a)
    assert first == _epoch_rows(b)
    assert first != _epoch_rows(c)
    second = _epoch_rows(a)
    assert sorted(second) == sorted(first) and second != first  # a fresh permutation each epoch
    assert a.state_dict()["epoch"] == 2


def test_resumed_run_yields_identical_batches(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, _stream(13 * WIDTH, 500).astype(np.int64))
    full = TokenData.open(str(path), seq_len=SEQ, seed=7)
    expected = [full.next_batch(3) for _ in range(12)]  # 36 windows: crosses two epoch boundaries mid-batch
    run = TokenData.open(str(path), seq_len=SEQ, seed=7)
    for _ in range(5):
        run.next_batch(3)
    state = dict(run.state_dict())
    resumed = TokenData.open(str(path), seq_len=SEQ, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = resumed.next_batch(3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_refuses_other_data(tmp_path):
    path = tmp_path / "d.bin"
    _stream(10 * WIDTH, 100).astype("<u2").tofile(path)
    state = TokenData.open(str(path), seq_len=SEQ, seed=0).state_dict()
    with pytest.raises(UserError, match="seq_len"):
        TokenData.open(str(path), seq_len=SEQ - 1, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="epoch, position and seed"):
        TokenData.open(str(path), seq_len=SEQ, seed=0).load_state_dict({"epoch": 0})


def test_user_errors_name_the_file(tmp_path):
    def fails(path, match, **kw):
        with pytest.raises(UserError, match=match) as e:
            TokenData.open(str(path), seq_len=kw.pop("seq_len", SEQ), seed=0, **kw)
        assert str(path) in str(e.value)

    fails(tmp_path / "missing.bin", "does not exist")
    (tmp_path / "empty.bin").write_bytes(b"")
    fails(tmp_path / "empty.bin", "empty")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    fails(tmp_path / "odd.bin", "not a multiple of 2")
    (tmp_path / "short.u32.bin").write_bytes(np.arange(5, dtype="<u4").tobytes())
    fails(tmp_path / "short.u32.bin", "fewer than one window")
    fails(tmp_path / "short.u32.bin", "named as uint32", dtype="uint16")
    fails(tmp_path / "short.u32.bin", "not supported", dtype="int8")
    np.save(tmp_path / "floats.npy", np.zeros(100, dtype=np.float32))
    fails(tmp_path / "floats.npy", "integers")
    np.save(tmp_path / "grid.npy", np.zeros((10, 10), dtype=np.int32))
    fails(tmp_path / "grid.npy", "1-D")
    (tmp_path / "notnpy.npy").write_bytes(b"hello there, not numpy")
    fails(tmp_path / "notnpy.npy", "not a readable .npy")
    fails(tmp_path, "directory")

    path = tmp_path / "ok.bin"
    np.array([3, 9, 300] * 30, dtype="<u2").tofile(path)
    data = TokenData.open(str(path), seq_len=SEQ, seed=0)
    data.check_vocab(301)
    with pytest.raises(UserError, match="token id 300") as e:
        data.check_vocab(300)
    assert str(path) in str(e.value)
    data.require_windows(10)
    with pytest.raises(UserError, match="one step needs 11") as e:
        data.require_windows(11)
    assert str(path) in str(e.value)
    np.save(tmp_path / "neg.npy", np.array([1, -4] * 20, dtype=np.int16))
    with pytest.raises(UserError, match="negative"):
        TokenData.open(str(tmp_path / "neg.npy"), seq_len=SEQ, seed=0).check_vocab(10)
