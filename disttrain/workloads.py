"""What the main job trains: a model, each rank's batch at each step, the loss and the evaluation.

One signature for every workload (``WORKLOADS[name](cfg, rank, world)``), so the training loop in
train.py is the same for an MLP on fixed-size images and a seq2seq model on variable-length text:

- ``batch(step)`` -> Batch: this rank's inputs and targets for the global step, how many loss
  terms they hold (samples, or real target tokens) and how many the whole global batch holds -
  computed locally from the deterministic plan, no communication;
- ``evaluate(model)`` -> dict of held-out metrics.

``train_step`` weights each rank's gradient so that DataParallel's average over ranks is exactly the
gradient of the mean loss over the *global* batch, also when ranks hold different numbers of loss
terms (length bucketing, token budgets) or none at all (a rank then joins the gradient averaging
with zero gradients instead of leaving the others waiting).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from . import groups, nn, zoo
from .data import Batcher, DistributedSampler, clicks, load, text
from .parallel.vocab import VocabParallelCrossEntropy
from .registry import Registry


@dataclass
class Batch:
    inputs: object
    targets: np.ndarray
    count: int  # loss terms on this rank (what the loss averages over)
    global_count: int  # loss terms over all ranks in this step
    stats: dict = field(default_factory=dict)  # per-step data statistics (padding, imbalance)


def train_step(ddp, loss_fn, batch: Batch, world: int) -> float:
    """Forward and backward of this rank's share of one global batch; returns the local mean loss.

    The loss averages over the rank's own `count` terms and DataParallel averages over the ranks,
    so the rank's gradient is scaled by count * world / global_count: the average over ranks is
    then sum(all terms' gradients) / global_count, the one-process gradient on the global batch.
    """
    if batch.count == 0 and all(p.replicated for p in ddp.model.parameters()):
        ddp.synchronize()  # nothing to learn from this step, but the collective needs every rank
        return 0.0
    # (a model with sharded layers - embeddings over AllToAll - runs its empty batch through
    # forward and backward instead: the other ranks' lookups need this rank's shard)
    loss = loss_fn.forward(ddp.forward(batch.inputs), batch.targets)
    d = loss_fn.backward()
    scale = gradient_scale(batch, world)
    if scale != 1.0:  # equal shares (scale exactly 1) stay bit-identical to the unweighted step
        d *= d.dtype.type(scale)
    ddp.backward(d)
    return loss


def gradient_scale(batch: Batch, world: int) -> float:
    """The factor on a replica's mean-loss gradient that makes DataParallel's average over `world`
    replicas the gradient of the mean over the global batch: count * world / global_count (exactly
    1 for equal shares). A pipeline applies it on its last stage (``Pipeline.step(weight=)``)."""
    return batch.count * world / max(1, batch.global_count)


class _FixedBatch:
    """A workload whose every step is a fixed global batch of samples, shared over the data-parallel
    ranks by a DistributedSampler - equally when the ranks divide it, else differing by at most one
    sample (train_step weights by count), so every dp trains the same model: an elastic restart
    on another number of ranks continues the same run. Subclasses say how samples become arrays (take)."""

    unit = "samples"

    def _sample(self, n: int, cfg, rank: int, world: int) -> None:
        self.sampler = DistributedSampler(n, cfg.global_batch_size, rank, world, seed=cfg.seed, uneven=True)
        self.B = cfg.global_batch_size

    def take(self, idx) -> tuple:
        raise NotImplementedError

    def batch(self, step: int) -> Batch:
        idx = self.sampler.indices(step)
        return Batch(*self.take(idx), len(idx), self.B)


WORKLOADS = Registry("workload")


def agree_on_data(digest, err: str | None = None) -> None:
    """A workload that reads its data on each host (``data_digest``: the pydocs corpus comes from
    the host's own standard library, so another Python version gives other sentences and another
    vocabulary) must hold the same data on every rank: otherwise the ranks train on different
    sentences under different token ids, and nothing else would notice. The same ValueError on
    every rank (one allgather over the world of the digests and of `err`, this rank's error
    reading its data: a rank whose own data made the set-up fail - a sentence over --max-tokens
    in its corpus - returned exit status 2 alone while its peers waited for it forever)."""
    every = groups.world().comm.allgather((err, digest))
    failed = [(r, e) for r, (e, _) in enumerate(every) if e]
    if failed:
        r, e = failed[0]
        if len(failed) == len(every) and all(m == e for _, m in failed):
            raise ValueError(e)  # the configuration's own error: the same everywhere
        raise ValueError(f"{e} (on rank(s) {[q for q, m in failed if m == e]} only: the ranks' data differ)")
    every = [d for _, d in every]
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise ValueError(f"rank(s) {odd} built other training data than rank 0 (the pydocs corpus is read from "
                         "each host's own Python standard library: run every rank with the same Python installation)")


@contextlib.contextmanager
def _own_data(work, mesh):
    """Around the part of a workload's set-up that reads this rank's data: with a mesh (the job's
    set-up, collective over the world), its ValueError, another rank's, or data that differ raise
    the same ValueError on every rank at the end of the block (agree_on_data) - before the model
    is built, which is collective under tensor parallelism (every tp layer checks its split with
    its group: a rank whose data failed waited in the job's agreement while its tp peers waited
    in their first layer for it - review6). Without a mesh (one process, or a caller's own
    agreement) the block is left alone: its model has no group to wait in."""
    if mesh is None:
        yield
        return
    err = None
    try:
        yield
    except ValueError as e:
        err = str(e)
    agree_on_data(getattr(work, "data_digest", None), err)


@WORKLOADS.register("mlp")
class Classification(_FixedBatch):
    """MLP on an embedded data set (digits): equal shares of a fixed global batch per rank."""

    def __init__(self, cfg, rank: int, world: int, mesh=None):
        MLP = zoo.model("mlp")

        self.data = load(cfg.dataset)
        self._sample(len(self.data.y_train), cfg, rank, world)
        sizes = [self.data.x_train.shape[1], *[int(h) for h in cfg.hidden.split(",") if h], self.data.num_classes]
        self.model = MLP(sizes, seed=cfg.seed, dtype=np.dtype(cfg.dtype), tp_group=_tp_group(mesh))
        self.loss_fn = nn.SoftmaxCrossEntropy()
        d = self.data
        self.description = (f"{cfg.model} {cfg.hidden} on {d.name} ({len(d.y_train)} train / {len(d.y_test)} test) | "
                            f"global batch {cfg.global_batch_size}")

    def take(self, idx) -> tuple:
        return self.data.x_train[idx], self.data.y_train[idx]

    def evaluate(self, model, final: bool = False) -> dict:
        out = dict(test_accuracy=_accuracy(model, self.data.x_test, self.data.y_test))
        if final:
            out["train_accuracy"] = _accuracy(model, self.data.x_train, self.data.y_train)
        return out


def _accuracy(model, x, y) -> float:
    model.eval()
    pred = model.forward(x).argmax(axis=1)
    model.train()
    return float((pred == y).mean())


@WORKLOADS.register("gnmt")
class Seq2SeqTranslation:
    """GNMT-lite on the standard-library documentation corpus (reverse translation, data/text.py),
    batched by a data/bucketing.py strategy: `--batching`, and `--max-tokens` (padded tokens per
    rank per step) or `--global-batch-size` (sentences per step). The loss terms are real target
    tokens (padding is ignored), so ranks' shares differ and train_step weights them.

    `corpus` (a data.text.Seq2Seq) replaces the standard-library corpus: your own data, or tests."""

    unit = "tokens"

    def __init__(self, cfg, rank: int, world: int, mesh=None, corpus=None):
        GNMT = zoo.model("gnmt")

        if cfg.dataset != "pydocs" and corpus is None:
            raise ValueError(f"model gnmt trains on dataset 'pydocs', got {cfg.dataset!r}")
        emb, hidden, layers = _gnmt_sizes(cfg.hidden)
        with _own_data(self, mesh):  # this host's corpus: agreed before the (collective) model
            corpus = corpus or text.load_reverse_corpus(vocab_size=cfg.vocab_size)
            self.data_digest = corpus.digest()
            self.train, self.test = text.split(corpus, test_fraction=0.05, seed=0)
            sizing = dict(max_tokens=cfg.max_tokens) if cfg.max_tokens else dict(global_batch=cfg.global_batch_size)
            self.batcher = Batcher(self.train.lengths, cfg.batching, world, seed=cfg.seed, **sizing)
        self.rank = rank
        self._tgt_len = np.array([len(t) for t in self.train.tgt], np.int64)
        self._plans, self._starts = {}, [0]  # epoch -> plan; first global step of each planned epoch
        tp = _tp_group(mesh)  # the output layer split by vocabulary, the rest replicated over tp
        self.model = GNMT(len(corpus.vocab), emb=emb, hidden=hidden, layers=layers, seed=cfg.seed,
                          dtype=np.dtype(cfg.dtype), tp_group=tp)
        self.loss_fn = _cross_entropy(tp, text.PAD)
        size = f"max {cfg.max_tokens} padded tokens/rank" if cfg.max_tokens else f"{cfg.global_batch_size} sentences"
        self.description = (f"gnmt {emb},{hidden},{layers} on pydocs reverse translation ({len(self.train)} train / "
                            f"{len(self.test)} test sentences, vocab {len(corpus.vocab)}) | {cfg.batching} "
                            f"batching, {size} per step")

    def _locate(self, step: int):
        """(plan, step within its epoch, epoch) for a global step: epochs can differ in step count
        (token budgets), so walk the known epoch starts - deterministic, identical on every rank;
        an epoch is planned once when first reached, not again on every step."""
        e = 0
        while True:
            if len(self._starts) == e + 1:  # epoch e's length is not known yet
                self._plan(e)
            if step < self._starts[e + 1]:
                return self._plan(e), step - self._starts[e], e
            e += 1

    def _plan(self, e: int):
        if e not in self._plans:
            if len(self._plans) >= 2:  # keep memory flat on long runs
                self._plans.pop(min(self._plans))
            self._plans[e] = self.batcher.plan(e)
            if len(self._starts) == e + 1:
                self._starts.append(self._starts[e] + len(self._plans[e]))
        return self._plans[e]

    def batch(self, step: int) -> Batch:
        plan, s, epoch = self._locate(step)
        per_rank = plan.steps[s]
        idx = per_rank[self.rank]
        src, s_len, tgt_in, tgt_out = self.train.batch(idx)
        counts = [int(self._tgt_len[i].sum()) for i in per_rank]
        st = plan.step_stats(s)
        return Batch((src, s_len, tgt_in), tgt_out, counts[self.rank], sum(counts),
                     dict(epoch=epoch, padding=st["padding"], imbalance=st["imbalance"],
                          real_tokens=int(st["real_tokens"].sum()), padded_tokens=int(st["padded_tokens"].sum())))

    def evaluate(self, model, final: bool = False, chunk: int = 128) -> dict:
        """Token-mean cross-entropy and token accuracy of teacher-forced decoding on the test split."""
        order = np.argsort(self.test.lengths, kind="stable")
        loss_fn = nn.SoftmaxCrossEntropy(ignore_index=text.PAD)
        total, correct, count = 0.0, 0, 0
        model.eval()
        for i in range(0, len(order), chunk):
            src, s_len, tgt_in, tgt_out = self.test.batch(order[i:i + chunk])
            logits = model.forward((src, s_len, tgt_in))
            n = int((tgt_out != text.PAD).sum())
            total += loss_fn.forward(logits, tgt_out) * n
            correct += int(((logits.argmax(-1) == tgt_out) & (tgt_out != text.PAD)).sum())
            count += n
        model.train()
        return dict(test_loss=total / count, test_token_accuracy=correct / count)


@WORKLOADS.register("transformer")
class LanguageModel(_FixedBatch):
    """A small GPT-style transformer (models/transformer.py) as a next-token language model on the
    standard-library documentation corpus (data/text.py): the training sentences joined by EOS into
    one token stream, cut into windows of `--seq-len`; each window predicts its next tokens. The
    model is tensor-parallel over `mesh.tp_group` when tp > 1 and its blocks are the pipeline
    units. `--hidden` is "D,HEADS,LAYERS"."""

    def __init__(self, cfg, rank: int, world: int, mesh=None):
        Transformer = zoo.model("transformer")

        if cfg.dataset != "pydocs":
            raise ValueError(f"model transformer trains on dataset 'pydocs', got {cfg.dataset!r}")
        d, heads, layers = _int_list(cfg.hidden, 3, "transformer", "D,HEADS,LAYERS (e.g. 64,4,2)")
        with _own_data(self, mesh):  # this host's corpus: agreed before the (collective) model
            corpus = text.load_reverse_corpus(vocab_size=cfg.vocab_size)
            self.data_digest = corpus.digest()
            train, test = text.split(corpus, test_fraction=0.05, seed=0)
            self.x, self.y = _windows(train.src, cfg.seq_len)
            self.x_test, self.y_test = _windows(test.src, cfg.seq_len)
            if not len(self.x_test):  # evaluate() divided by zero - after the whole run, before its last checkpoint
                raise ValueError(f"seq-len {cfg.seq_len} leaves no held-out window: the test split has "
                                 f"{sum(len(s) + 1 for s in test.src)} tokens; use a shorter --seq-len")
        self._sample(len(self.x), cfg, rank, world)
        tp = _tp_group(mesh)
        self.model = Transformer(len(corpus.vocab), d=d, heads=heads, layers=layers, max_len=cfg.seq_len, group=tp,
                                 seed=cfg.seed, dtype=np.dtype(cfg.dtype), vocab_parallel=True)
        self.loss_fn = _cross_entropy(tp)
        self.description = (f"transformer {cfg.hidden} (d, heads, layers) LM on pydocs ({len(self.x)} train / "
                            f"{len(self.x_test)} test windows of {cfg.seq_len} tokens, vocab {len(corpus.vocab)}) | "
                            f"global batch {cfg.global_batch_size}")

    def take(self, idx) -> tuple:
        return self.x[idx], self.y[idx]

    def evaluate(self, model, final: bool = False, chunk: int = 256) -> dict:
        """Next-token cross-entropy, perplexity and accuracy on the held-out windows (collective
        under tensor or pipeline parallelism: every rank runs it)."""
        loss_fn = nn.SoftmaxCrossEntropy()
        total = correct = 0.0
        model.eval()
        for i in range(0, len(self.x_test), chunk):
            x, y = self.x_test[i:i + chunk], self.y_test[i:i + chunk]
            logits = model.forward(x)
            total += loss_fn.forward(logits, y) * y.size
            correct += float((logits.argmax(-1) == y).sum())
        model.train()
        n = self.y_test.size
        return dict(test_loss=total / n, test_perplexity=float(np.exp(total / n)), test_token_accuracy=correct / n)


def _tp_group(mesh):
    """The tensor-parallel group of a mesh with tp > 1, else None (the one-process layers)."""
    return mesh.tp_group if mesh is not None and mesh.tp > 1 else None


def _cross_entropy(tp, ignore_index: int = -100):
    """The training loss over vocabulary logits: Megatron's parallel softmax when the output layer
    is split over tp (parallel/vocab.py), else the plain one."""
    if tp is None:
        return nn.SoftmaxCrossEntropy(ignore_index=ignore_index)
    return VocabParallelCrossEntropy(tp, ignore_index=ignore_index)


def _windows(sentences, seq_len: int) -> tuple:
    """(inputs, next-token targets), each (n, seq_len), from the sentences joined by EOS."""
    stream = np.concatenate([np.append(s, text.EOS) for s in sentences])
    n = (len(stream) - 1) // seq_len
    x = stream[:n * seq_len].reshape(n, seq_len)
    y = stream[1:n * seq_len + 1].reshape(n, seq_len)
    return x, y


@WORKLOADS.register("dlrm")
class ClickPrediction(_FixedBatch):
    """DLRM-style recommender on synthetic power-law click data (data/clicks.py): the MLPs
    data-parallel, the embedding tables sharded over the ranks (`--sharding table | row`) and looked
    up with AllToAll (parallel/embedding.py). `--hidden` is "DIM,BOTTOM,TOP" (embedding width and
    the bottom / top MLP widths); `--tables` the rows of each table. `--sparse-embeddings` (default
    on) gives the tables row-sparse gradients: only the looked-up rows are updated (lazy SGD
    momentum / lazy Adam, optim/rowwise.py)."""

    def __init__(self, cfg, rank: int, world: int, mesh=None):
        DLRM = zoo.model("dlrm")
        if cfg.dataset != "clicks":
            raise ValueError(f"model dlrm trains on dataset 'clicks', got {cfg.dataset!r}")
        dim, bottom, top = _int_list(cfg.hidden, 3, "dlrm", "DIM,BOTTOM,TOP (e.g. 16,64,64)")
        sizes = _int_list(cfg.tables, None, "tables", "rows per table (e.g. 10000,1000,100)")
        data = clicks.synthetic_clicks(cfg.samples, sizes, dense=8, seed=cfg.seed + 12345, dtype=np.dtype(cfg.dtype))
        self.train, self.test = clicks.split(data, 0.1)
        if not len(self.test):  # evaluate() of no samples: NaN metrics (and NumPy's empty-mean warnings)
            raise ValueError(f"samples {cfg.samples} leave no test samples (10% are held out): use --samples >= 6")
        self._sample(len(self.train), cfg, rank, world)
        group = mesh.dp_group if mesh else None
        tp = _tp_group(mesh)
        self.model = DLRM(sizes, dim=dim, dense=8, bottom=(bottom,), top=(top,), sharding=cfg.sharding, group=group,
                          seed=cfg.seed, dtype=np.dtype(cfg.dtype), algorithm=cfg.alltoall_algorithm,
                          sparse=cfg.sparse_embeddings, tp_group=tp)
        self.loss_fn = nn.BCEWithLogits()
        self.description = (f"dlrm {cfg.hidden} on synthetic clicks ({len(self.train)} train / {len(self.test)} test, "
                            f"{len(sizes)} tables {sizes}, ids ~ power law) | {cfg.sharding}-wise sharded embeddings, "
                            f"{'sparse' if cfg.sparse_embeddings else 'dense'} updates | "
                            f"global batch {cfg.global_batch_size}")

    def take(self, idx) -> tuple:
        t = self.train
        return (t.dense[idx], t.ids[idx]), t.clicks[idx][:, None]

    def evaluate(self, model, final: bool = False) -> dict:
        """Held-out log-loss next to the base rate's and the teacher's (the floor), AUC, accuracy.
        Collective (the embedding lookups): every rank evaluates the whole test split."""
        t = self.test
        z = model.forward((t.dense, t.ids))[:, 0].astype(np.float64)
        y = t.clicks.astype(np.float64)
        logloss = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
        p = float(y.mean()) if y.size else 0.5
        base = float(-sum(q * np.log(q) for q in (p, 1 - p) if q > 0))  # 0 log 0 = 0 (one class only: 0, not NaN)
        return dict(test_logloss=logloss, base_rate_logloss=base, teacher_logloss=t.bayes_logloss,
                    test_auc=_auc(z, y), test_accuracy=float(((z > 0) == (y > 0.5)).mean()))


def _auc(score, y) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties averaged."""
    order = np.argsort(score, kind="stable")
    _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
    ranks = np.empty(len(score))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # the mean 1-based rank of each tie run
    pos = y > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if not n1 or not n0:  # one class only (a tiny test split): undefined - not 0, which reads as a perfect inversion
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _int_list(spec: str, n, what: str, form: str) -> list:
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or (n is not None and len(vals) != n) or min(vals) < 1:
        raise ValueError(f"{what}: expected {form}, got {spec!r}")
    return vals


def _gnmt_sizes(spec: str) -> tuple:
    """`--hidden` for gnmt: "EMB,HIDDEN,LAYERS" (default 64,128,2)."""
    try:
        emb, hidden, layers = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"for model gnmt, hidden is 'EMB,HIDDEN,LAYERS' (e.g. 64,128,2), got {spec!r}") from None
    if min(emb, hidden, layers) < 1:
        raise ValueError(f"gnmt sizes must be positive, got {spec!r}")
    return emb, hidden, layers


def dp_invariant(cfg) -> bool:
    """Whether every step's global batch is the same at any number of data-parallel replicas - what
    resuming at another dp (an elastic restart on fewer ranks) needs to continue the same run. The
    fixed-batch workloads share one global batch (unevenly if need be); gnmt only with load_balanced
    batching of a --global-batch-size: naive and bucketed shard the epoch per rank, and a
    --max-tokens budget is per rank, so there the batches change with dp."""
    return cfg.model != "gnmt" or (cfg.batching == "load_balanced" and not cfg.max_tokens)


#: --model -> workload class

#: per-model defaults, applied before the config file and the flags (which win)
MODEL_DEFAULTS = {
    "mlp": {},
    # vocabulary 200 (the rest is UNK): attention learns the reversal within ~4 epochs (loss 4.6 ->
    # ~1.2 at global batch 64); with 1,000 words the loss still sits near the unigram entropy then
    "gnmt": dict(dataset="pydocs", hidden="64,128,2", vocab_size=200, optimizer="adam", lr=0.01,
                 weight_decay=0.0, warmup_steps=30, steps=500, max_tokens=1024, log_every=25),
    "transformer": dict(dataset="pydocs", hidden="64,4,2", vocab_size=500, optimizer="adam", lr=0.003,
                        weight_decay=0.0, warmup_steps=30, steps=400, global_batch_size=32, log_every=50),
    "dlrm": dict(dataset="clicks", hidden="16,64,64", optimizer="adam", lr=0.003, weight_decay=0.0, steps=600,
                 global_batch_size=256, warmup_steps=20, log_every=50),
}
