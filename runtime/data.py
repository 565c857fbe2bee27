"""Training data: one token stream cut into packed, non-overlapping windows, served in a seeded shuffled order
(or in file order).

The stream is cut from its start into windows of seq_len + 1 tokens (window k is tokens [k(seq+1), (k+1)(seq+1));
the tail that does not fill a window is never used). A window's first seq_len tokens are the inputs and its last
seq_len the labels, so the labels are already shifted and the model's Head compares position i with token i + 1.
With order "shuffled" each epoch visits every window once in a permutation drawn from (seed, epoch); with
"sequential" in file order. Either way a run is reproducible and a resumed run, given the state_dict saved with
its checkpoint, yields exactly the batches the uninterrupted run would have.

Data parallel (`next_step` with world N): one optimizer step consumes the next N x grad_accum x micro_batch
windows of the order, the global batch, and rank r takes the r-th contiguous slice of them, grad_accum micro-batches
of micro_batch windows. Every rank walks the same order with the same cursor, so the ranks read disjoint windows,
the cursor (the checkpoint's data position) is the same on every rank, and N ranks at micro-batch b read exactly
the windows one rank reads with grad_accum N x grad_accum, in the same micro-batches.

Token files are memory-mapped: a 20 GB .bin costs page cache, not resident memory. Formats, by name:
  *.bin      raw little-endian uint16 (uint32 when the name ends in .u32.bin or dtype='uint32')
  *.npy      a 1-D array of any integer dtype
  otherwise  UTF-8 text: its bytes are the tokens (vocab 256), or with tokenizer_dir a local HF tokenizer's ids
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from planner.errors import UserError

_BIN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SCAN_TOKENS = 1 << 24  # max_token() reads the file in slices of this many tokens, never all at once
ORDERS = ("shuffled", "sequential")
_HASH_EDGE_BYTES = 1 << 20  # the data fingerprint hashes the first and last MiB of the file and its size


class TokenData:
    """A packed token stream and a cursor (epoch, position) into its per-epoch window order."""

    def __init__(self, tokens: np.ndarray, *, path: str, seq_len: int, seed: int, vocab: int | None = None,
                 order: str = "shuffled"):
        if order not in ORDERS:
            raise UserError(f"data order '{order}' is not one of {', '.join(ORDERS)}.")
        self.tokens = tokens          # 1-D integer array, usually a np.memmap
        self.path = path
        self.seq_len = seq_len
        self.seed = seed
        self.order = order
        self.vocab = vocab            # known vocabulary (256 for bytes, the tokenizer's), None for token files
        self.n_windows = len(tokens) // (seq_len + 1)
        self.epoch = 0
        self.position = 0             # windows of the current epoch already served
        self._order: tuple[int, np.ndarray] | None = None
        self._range: tuple[int, int] | None = None
        if self.n_windows == 0:
            raise UserError(f"data file '{path}' holds {len(tokens)} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; use a shorter --seq-len or more data.")

    @classmethod
    def open(cls, path: str, *, seq_len: int, seed: int, tokenizer_dir: str | None = None,
             dtype: str | None = None, order: str = "shuffled") -> "TokenData":
        """Open a token file or text file (see the module docstring); errors are UserErrors naming the file."""
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise UserError(f"seq_len must be a positive integer, got {seq_len!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UserError(f"the data seed must be a non-negative integer, got {seed!r}.")
        if dtype is not None and dtype not in _BIN_DTYPES:
            raise UserError(f"data dtype '{dtype}' is not supported for '{path}'; use uint16 or uint32.")
        if not os.path.isfile(path):  # a FIFO or a device would block or never end
            what = ("is a directory, not a file" if os.path.isdir(path) else
                    "is not a regular file" if os.path.exists(path) else "does not exist")
            raise UserError(f"data file '{path}' {what}.")
        if os.path.getsize(path) == 0:
            raise UserError(f"data file '{path}' is empty.")
        vocab = None
        try:
            if path.endswith(".bin"):
                tokens = _open_bin(path, dtype)
            elif path.endswith(".npy"):
                tokens = _open_npy(path, dtype)
            else:
                if dtype is not None:
                    raise UserError(f"data file '{path}' is read as text; dtype='{dtype}' applies only to "
                                    f".bin token files.")
                tokens, vocab = _open_text(path, tokenizer_dir)
        except OSError as e:
            raise UserError(f"data file '{path}' could not be read ({e.strerror or e}).") from None
        if len(tokens) == 0:
            raise UserError(f"data file '{path}' holds no tokens.")
        return cls(tokens, path=path, seq_len=seq_len, seed=seed, vocab=vocab, order=order)

    # -- order and batches -------------------------------------------------------------------------------------

    def _epoch_order(self) -> np.ndarray:
        # A SeedSequence of (seed, epoch) rather than seed + epoch: seed 1 epoch 0 must not replay seed 0 epoch 1.
        if self._order is None or self._order[0] != self.epoch:
            if self.order == "sequential":
                self._order = (self.epoch, np.arange(self.n_windows))
            else:
                rng = np.random.default_rng((self.seed, self.epoch))
                self._order = (self.epoch, rng.permutation(self.n_windows))
        return self._order[1]

    def next_batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), both int64 [micro_batch, seq_len]; a batch may run across an epoch boundary."""
        if micro_batch <= 0:
            raise UserError(f"micro batch must be a positive integer, got {micro_batch!r}.")
        return self._windows(self._take(micro_batch))

    def next_step(self, micro_batch: int, grad_accum: int, *, rank: int = 0, world: int = 1) \
            -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Rank `rank`'s grad_accum micro-batches of one optimizer step over `world` ranks (module docstring).
        With world 1: grad_accum consecutive next_batch(micro_batch) calls."""
        if micro_batch <= 0 or grad_accum <= 0 or not 0 <= rank < world:
            raise UserError(f"a step needs positive micro_batch and grad_accum and 0 <= rank < world, got "
                            f"{micro_batch}, {grad_accum}, rank {rank} of {world}.")
        per_rank = micro_batch * grad_accum
        mine = self._take(world * per_rank)[rank * per_rank:(rank + 1) * per_rank]
        return [self._windows(mine[k * micro_batch:(k + 1) * micro_batch]) for k in range(grad_accum)]

    def _take(self, n: int) -> list[int]:
        """The next n window indices of the order, advancing the cursor (across epochs if need be)."""
        picked = []
        while len(picked) < n:
            order = self._epoch_order()
            take = min(n - len(picked), self.n_windows - self.position)
            picked.extend(order[self.position:self.position + take].tolist())
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return picked

    def _windows(self, picked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.seq_len + 1
        starts = np.asarray(picked, dtype=np.int64) * width
        # Fancy indexing on a memmap reads only the chosen windows.
        windows = torch.from_numpy(np.asarray(self.tokens[starts[:, None] + np.arange(width)], dtype=np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    # -- checks --------------------------------------------------------------------------------------------------

    def token_range(self) -> tuple[int, int]:
        """(smallest, largest) token id, scanned once in slices so a huge file is never loaded whole."""
        if self._range is None:
            lo, hi = None, None
            for i in range(0, len(self.tokens), _SCAN_TOKENS):
                part = np.asarray(self.tokens[i:i + _SCAN_TOKENS])
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
            self._range = (lo, hi)
        return self._range

    def max_token(self) -> int:
        return self.token_range()[1]

    def check_vocab(self, vocab: int) -> None:
        """Fail before training if a token id would index past the model's embedding."""
        lo, hi = self.token_range()
        if lo < 0:
            raise UserError(f"data file '{self.path}' holds a negative token id ({lo}); token ids must be >= 0.")
        if hi >= vocab:
            raise UserError(f"data file '{self.path}' holds token id {hi}, but the model's vocabulary has only "
                            f"{vocab} entries (ids 0..{vocab - 1}); the data was tokenized for another model, or "
                            f"the dtype is wrong (a uint32 file read as uint16 or the reverse).")

    def require_windows(self, n: int) -> None:
        """Fail if one optimizer step needs more windows than an epoch holds (it would repeat data in a step)."""
        if self.n_windows < n:
            raise UserError(f"data file '{self.path}' holds {self.n_windows} windows of {self.seq_len + 1} tokens, "
                            f"but one step needs {n}; use more data, a shorter seq_len or a smaller batch.")

    # -- resume --------------------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A cheap content hash of the data file: sha256 of its size, first MiB and last MiB. Another file of the
        same length (a different corpus, a re-tokenisation) changes it; reading 2 MiB costs nothing."""
        h = hashlib.sha256()
        try:
            size = os.path.getsize(self.path)
            h.update(str(size).encode())
            with open(self.path, "rb") as f:
                h.update(f.read(_HASH_EDGE_BYTES))
                if size > _HASH_EDGE_BYTES:
                    f.seek(max(_HASH_EDGE_BYTES, size - _HASH_EDGE_BYTES))
                    h.update(f.read(_HASH_EDGE_BYTES))
        except OSError as e:
            raise UserError(f"data file '{self.path}' could not be read ({e.strerror or e}).") from None
        return h.hexdigest()[:32]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_windows": self.n_windows, "order": self.order,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where a saved run stopped; its seed wins, and different data or seq_len is refused."""
        try:
            epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"the saved data state {state!r} is incomplete; it needs epoch, position and seed.") \
                from None
        for key, mine in (("seq_len", self.seq_len), ("n_windows", self.n_windows)):
            if key in state and state[key] != mine:
                raise UserError(f"data file '{self.path}' gives {key} = {mine}, but the checkpoint was trained "
                                f"with {key} = {state[key]}; resume with the same data and seq_len.")
        if epoch < 0 or not 0 <= position < self.n_windows or seed < 0:
            raise UserError(f"the saved data state {state!r} is out of range for '{self.path}' "
                            f"({self.n_windows} windows).")
        self.epoch, self.position, self.seed, self._order = epoch, position, seed, None


def _open_bin(path: str, dtype: str | None) -> np.ndarray:
    named = "uint32" if path.endswith(".u32.bin") else None
    if dtype is not None and named is not None and dtype != named:
        raise UserError(f"data file '{path}' is named as {named} but dtype='{dtype}' was given; rename the file "
                        f"or drop the dtype.")
    np_dtype = _BIN_DTYPES[dtype or named or "uint16"]
    size = os.path.getsize(path)
    if size % np_dtype.itemsize:
        raise UserError(f"data file '{path}' has {size} bytes, not a multiple of {np_dtype.itemsize}; it is not "
                        f"a {np_dtype.name} token file (wrong dtype, or the file is truncated).")
    return np.memmap(path, dtype=np_dtype, mode="r")


def _open_npy(path: str, dtype: str | None) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(f"data file '{path}' is not a readable .npy array ({e}).") from None
    if not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"data file '{path}' holds {tokens.dtype} values; token ids must be integers.")
    if dtype is not None and tokens.dtype != _BIN_DTYPES[dtype]:
        raise UserError(f"data file '{path}' holds {tokens.dtype} tokens but dtype='{dtype}' was given.")
    if tokens.ndim != 1:
        raise UserError(f"data file '{path}' has shape {tokens.shape}; expected one flat token stream (1-D).")
    return tokens


def _check_utf8(path: str) -> None:
    """Refuse a text file that is not UTF-8 (a binary token file without the .bin name, say), in 16 MiB slices."""
    import codecs
    dec = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise UserError(f"data file '{path}' is not UTF-8 text ({e.reason} near byte {done + e.start}); "
                                f"token files must end in .bin or .npy.") from None
            if not chunk:
                return
            done += len(chunk)


def _open_text(path: str, tokenizer_dir: str | None) -> tuple[np.ndarray, int]:
    if tokenizer_dir is None:
        _check_utf8(path)
        return np.memmap(path, dtype=np.uint8, mode="r"), 256  # bytes are the tokens
    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"tokenizer directory '{tokenizer_dir}' does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); token files "
                        f"must end in .bin or .npy.") from None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("reading text with a tokenizer needs transformers: pip install 'blockfit[transformers]'.") \
            from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())  # transformers' messages span lines; a UserError is one paragraph
        raise UserError(f"tokenizer directory '{tokenizer_dir}' holds no loadable tokenizer ({why}).") from None
    tok.model_max_length = 1 << 62  # the whole file is one stream; silence the "longer than max length" warning
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64), len(tok)
