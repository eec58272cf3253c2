"""A real English corpus that every Python installation ships, as a sequence-to-sequence task.

Source: the documentation text inside CPython's standard library - the docstrings of the
top-level ``Lib/*.py`` modules and the reference-manual topics in ``pydoc_data/topics.py`` - under
the Python Software Foundation License (PSF-2.0), the same licence as Python itself. Nothing is
downloaded and nothing is stored in this repository: the text is read from the running
interpreter's own standard library (the exact sentences therefore depend on the Python version;
3.11 gives about 10,000). It is natural technical English with natural sentence-length variation
(median ~15 tokens, 5th-95th percentile ~5-40), which is what length bucketing is about.

Task ("reverse translation"): the target is the source sentence with its words in reverse order,
then EOS. A seq2seq model must learn it through attention (position t of the output depends on
position T-t of the input), the classic synthetic translation benchmark shape, with real
vocabulary and real lengths. Tokens: lower-cased words, numbers and single punctuation marks;
the most frequent ``vocab_size - 4`` get ids, the rest map to UNK.
"""
from __future__ import annotations

import ast
import collections
import glob
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_TOKEN = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class Seq2Seq:
    """Token-id sequences (no padding): ``src[i]`` and ``tgt[i]`` (ends with EOS)."""

    src: list
    tgt: list
    vocab: list

    def __len__(self) -> int:
        return len(self.src)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample for batching: the longer of source and target."""
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt)], np.int64)

    def digest(self) -> str:
        """SHA-256 of the vocabulary and every (source, target) pair, in order: ranks that read
        the corpus on their own host compare it (the sentences depend on that host's Python)."""
        h = hashlib.sha256("\n".join(self.vocab).encode())
        for part in (self.src, self.tgt):
            h.update(np.array([len(a) for a in part], np.int64).tobytes())
            if part:
                h.update(np.concatenate(part).astype(np.int64, copy=False).tobytes())
        return h.hexdigest()

    def subset(self, idx) -> "Seq2Seq":
        return Seq2Seq([self.src[i] for i in idx], [self.tgt[i] for i in idx], self.vocab)

    def batch(self, idx):
        """Padded arrays for samples idx: (src (B, S), src_len (B,), tgt_in (B, T), tgt_out (B, T)).

        tgt_in = BOS + target[:-1] (teacher forcing), tgt_out = target; padding is PAD (0).
        """
        idx = list(idx)
        b = len(idx)
        s_len = np.array([len(self.src[i]) for i in idx], np.int64)
        t_len = np.array([len(self.tgt[i]) for i in idx], np.int64)
        src = np.zeros((b, int(s_len.max()) if b else 0), np.int64)
        tin = np.zeros((b, int(t_len.max()) if b else 0), np.int64)
        tout = np.zeros_like(tin)
        for j, i in enumerate(idx):
            src[j, :s_len[j]] = self.src[i]
            tout[j, :t_len[j]] = self.tgt[i]
            tin[j, 0] = BOS
            tin[j, 1:t_len[j]] = self.tgt[i][:-1]
        return src, s_len, tin, tout


def _documentation_text() -> list:
    """Paragraphs of prose from the standard library's docstrings and pydoc topics (code skipped)."""
    blocks = []
    lib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(lib, "*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc:
                    blocks.append(doc)
    try:
        from pydoc_data.topics import topics  # optional (see below): imported only if present
        blocks.extend(topics[k] for k in sorted(topics))
    except ImportError:  # some distributions split pydoc_data out; docstrings alone suffice
        pass
    paras = []
    for block in blocks:
        for para in re.split(r"\n\s*\n", block):
            lines = para.split("\n")
            if any(ln.startswith((" ", "\t", ">>>")) for ln in lines):  # code, examples, tables
                continue
            paras.append(" ".join(ln.strip() for ln in lines))
    return paras


def load_reverse_corpus(vocab_size: int = 1000, min_len: int = 3, max_len: int = 40) -> Seq2Seq:
    """The standard-library documentation corpus as the reverse-translation task (module doc)."""
    sents = []
    seen = set()
    for para in _documentation_text():
        for s in _SENTENCE_END.split(para):
            toks = _TOKEN.findall(s.lower())
            key = " ".join(toks)
            if min_len <= len(toks) <= max_len and key not in seen:  # docstrings repeat: keep one
                seen.add(key)
                sents.append(toks)
    counts = collections.Counter(w for s in sents for w in s)
    vocab = SPECIALS + [w for w, _ in counts.most_common(vocab_size - len(SPECIALS))]
    ids = {w: i for i, w in enumerate(vocab)}
    src = [np.array([ids.get(w, UNK) for w in s], np.int64) for s in sents]
    tgt = [np.concatenate([s[::-1], [EOS]]) for s in src]
    return Seq2Seq(src, tgt, vocab)


def split(data: Seq2Seq, test_fraction: float = 0.05, seed: int = 0) -> tuple:
    """(train, test) by a fixed random permutation."""
    perm = np.random.default_rng(seed).permutation(len(data))
    n_test = max(1, int(len(data) * test_fraction))
    return data.subset(perm[n_test:]), data.subset(perm[:n_test])
