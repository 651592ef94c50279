"""Contribution analysis of Lin et al. ("On-Device Training Under 256KB Memory", 2022): how much
accuracy each part of a sparse update buys, measured with short fine-tunes, and the additive
:class:`~pyoptim.sparse.search.SearchSpace` built from it (docs/sparse_update.md, "Adaptation
tasks and contribution analysis").

With ``acc(S)`` the test accuracy after fine-tuning under scheme ``S`` (the classifier always
trains; :func:`pyoptim.sparse.tasks.finetune`) and positions counted from the end over the
conv layers (1 = the last conv before the classifier):

    bias_gain[k]       = acc(biases of the last k layers) - acc(classifier only)
    weight_gain[i][r]  = acc(biases of the last p_i layers + share r of W_i) - acc(biases of the
                         last p_i layers)

where ``p_i`` is layer ``i``'s position: the smallest bias window that covers it. The reference
of every weight entry is thus itself a bias entry (``k = p_i``), measured once. Every
``(entry, seed)`` is one fine-tune; the tables average over the seeds. Fine-tunes run in
``workers`` processes (spawned, one thread each) and every finished one is written to a JSON
cache at once (atomically), so an interrupted analysis resumes where it stopped.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .memory import memory_estimate
from .scheme import SparseUpdateScheme, fuse_bn, layer_names
from .search import SearchSpace
from .tasks import Task, _classifier, finetune

__all__ = ["DEFAULT_RATIOS", "ContributionTables", "contribution", "conv_positions",
           "default_candidates", "model_digest", "search_space", "update_scheme"]

DEFAULT_RATIOS = (1 / 8, 1 / 4, 1 / 2, 1.0)
_FORMAT = "pyoptim.sparse.contribution/1"
_WORKER: dict = {}


def conv_positions(model: nn.Module) -> Dict[str, int]:
    """Conv/linear layer -> position from the end (1 = the last), the classifier left out: the
    positions of ``SparseUpdateScheme.last_layers`` and ``SearchSpace``."""
    clf = _classifier(model)
    convs = [n for n in layer_names(model) if n != clf]
    return {n: len(convs) - i for i, n in enumerate(convs)}


def default_candidates(model: nn.Module, window: int = 16) -> List[str]:
    """The weight candidates: the dense (``groups == 1``) convs among the last ``window`` layers.
    Depthwise convs are left out (9 weights a channel; their bias trains through the window)."""
    mods = dict(model.named_modules())
    return [n for n, p in sorted(conv_positions(model).items(), key=lambda kv: kv[1])
            if p <= window and isinstance(mods[n], nn.Conv2d) and mods[n].groups == 1]


@dataclass(frozen=True)
class _Entry:
    k: int
    layer: Optional[str]
    ratio: float
    seed: int

    @property
    def key(self) -> str:
        what = f"b{self.k}" if self.layer is None else f"w{self.k}:{self.layer}@{self.ratio:.6g}"
        return f"{what}/s{self.seed}"


def update_scheme(model: nn.Module, k: int, weights: Dict[str, float]) -> Optional[SparseUpdateScheme]:
    """The :class:`SparseUpdateScheme` training the biases of the last ``k`` layers and the share
    ``weights[layer]`` of those layers' weights (plus the classifier); ``None`` (classifier only)
    for ``k = 0`` without weights. ``update_scheme(model, s.k, s.ratios)`` turns a search
    :class:`~pyoptim.sparse.search.Scheme` into one."""
    if k == 0 and not weights:
        return None
    pos = conv_positions(model)
    return SparseUpdateScheme.last_layers(model, k, {-pos[n]: r for n, r in weights.items()})


def model_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s state dict: what a contribution table was measured on."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(model: nn.Module, task: Task, fn: Callable, hyper: dict) -> dict:
    return {"format": _FORMAT, "model": model_digest(model), "task": task.config(),
            "finetune": f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}",
            **hyper}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_cache(path: Path, identity: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"contribution: cache {path} is not readable JSON ({exc})") from None
    saved = _flat(data.get("identity", {})) if isinstance(data, dict) else {}
    wanted = _flat(json.loads(json.dumps(identity)))
    diff = [f"{k} {saved.get(k)!r} != {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if saved.get(k) != wanted.get(k)]
    if diff:
        raise ValueError(f"contribution: cache {path} was made for another model/task/config "
                         f"({'; '.join(diff)}); use another cache file or delete it")
    return dict(data.get("entries", {}))


def _save_cache(path: Path, identity: dict, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"identity": identity, "entries": entries}, indent=1, sort_keys=True))
    os.replace(tmp, path)                             # atomic: a crash leaves the old file whole


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run_one(model, task, fn, hyper: dict, scheme, seed: int) -> Tuple[float, float]:
    start = time.perf_counter()
    acc = fn(model, task, copy.deepcopy(scheme), seed=seed, **hyper)
    return float(acc), time.perf_counter() - start


def _init_worker(model, task, fn, hyper) -> None:
    torch.set_num_threads(1)
    _WORKER.update(model=model, task=task, fn=fn, hyper=hyper)


def _run_in_worker(scheme, seed: int) -> Tuple[float, float]:
    w = _WORKER
    return _run_one(w["model"], w["task"], w["fn"], w["hyper"], scheme, seed)


def _plan(model, ks, candidates, ratios, seeds) -> List[_Entry]:
    pos = conv_positions(model)
    unknown = [c for c in candidates if c not in pos]
    if unknown:
        raise ValueError(f"contribution: candidates {unknown} are not conv layers of the model "
                         f"(conv_positions(model) lists them)")
    ks = sorted(set(int(k) for k in ks) | {0} | {pos[c] for c in candidates})
    if ks[0] < 0 or ks[-1] > len(pos):
        raise ValueError(f"contribution: ks must lie in 0..{len(pos)}, got {ks}")
    entries = [_Entry(k, None, 0.0, s) for s in seeds for k in ks]
    entries += [_Entry(pos[c], c, float(r), s) for s in seeds for c in candidates for r in ratios]
    return entries


@contextlib.contextmanager
def _pool(workers: int, start_method: str, initargs):
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"               # inherited by the spawned workers
    try:
        with cf.ProcessPoolExecutor(workers, multiprocessing.get_context(start_method),
                                    initializer=_init_worker, initargs=initargs) as pool:
            yield pool
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def _run_all(todo, schemes, model, task, fn, hyper, workers, start_method, on_done) -> None:
    if workers <= 1:
        with _threads(1):                             # the workers' setting: serial == parallel
            for e in todo:
                on_done(e, *_run_one(model, task, fn, hyper, schemes[e.key], e.seed))
        return
    with _pool(workers, start_method, (model, task, fn, hyper)) as pool:
        futures = {pool.submit(_run_in_worker, schemes[e.key], e.seed): e for e in todo}
        try:
            for fut in cf.as_completed(futures):
                on_done(futures[fut], *fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


@dataclass
class ContributionTables:
    """The measured tables. Accuracies are fractions in [0, 1], averaged over ``seeds``.

    Attributes:
        ratios: the weight ratio levels; ks: the bias windows measured (0 = classifier only).
        positions: candidate layer -> position from the end.
        bias_accuracy / bias_gain: k -> accuracy, and its gain over k = 0.
        weight_accuracy / weight_gain: layer -> one value per ratio; the gain is over
            ``bias_accuracy[positions[layer]]``.
        identity: the model/task/fine-tune config the cache was made for; seconds: the sum of
            the fine-tunes' times (measured when each ran, cached ones included).
    """

    ratios: List[float]
    ks: List[int]
    seeds: List[int]
    positions: Dict[str, int]
    bias_accuracy: Dict[int, float]
    bias_gain: Dict[int, float]
    weight_accuracy: Dict[str, List[float]]
    weight_gain: Dict[str, List[float]]
    identity: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.identity.get("task", {}).get("classes", [])) or 0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("bias_accuracy", "bias_gain"):
            d[key] = {str(k): v for k, v in d[key].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ContributionTables":
        d = dict(d)
        for key in ("bias_accuracy", "bias_gain"):
            d[key] = {int(k): float(v) for k, v in d[key].items()}
        return cls(**d)


def _tables(model, entries: List[_Entry], results: dict, ratios, seeds, identity) -> ContributionTables:
    def mean(keys):
        return sum(results[k]["accuracy"] for k in keys) / len(keys)

    ks = sorted({e.k for e in entries if e.layer is None})
    pos = conv_positions(model)
    layers = sorted({e.layer for e in entries if e.layer is not None}, key=pos.get)
    bias_acc = {k: mean([_Entry(k, None, 0.0, s).key for s in seeds]) for k in ks}
    w_acc = {c: [mean([_Entry(pos[c], c, float(r), s).key for s in seeds]) for r in ratios]
             for c in layers}
    return ContributionTables(
        [float(r) for r in ratios], ks, list(seeds), {c: pos[c] for c in layers}, bias_acc,
        {k: a - bias_acc[0] for k, a in bias_acc.items()}, w_acc,
        {c: [a - bias_acc[pos[c]] for a in row] for c, row in w_acc.items()}, identity,
        sum(results[e.key]["seconds"] for e in entries))


def contribution(model: nn.Module, task: Task, *, ks: Optional[Sequence[int]] = None,
                 candidates: Optional[Sequence[str]] = None,
                 ratios: Sequence[float] = DEFAULT_RATIOS, seeds: Sequence[int] = (0,),
                 steps: int = 300, lr: float = 0.05, batch_size: int = 32, momentum: float = 0.9,
                 weight_decay: float = 0.0, workers: int = 1, cache=None,
                 finetune_fn: Callable = finetune, start_method: str = "spawn",
                 log: Optional[Callable[[str], None]] = None) -> ContributionTables:
    """Measures the contribution tables of ``model`` (the plain pretrained model) on ``task``.

    ``candidates``: the layers whose weight gains are measured (default
    :func:`default_candidates`: the dense convs among the last 16 layers); ``ks``: the bias
    windows (default ``0..max position of the candidates``; 0 and every candidate's position are
    always added, being the references); ``ratios`` the weight levels; ``seeds`` one fine-tune
    each. ``steps, lr, batch_size, momentum, weight_decay`` go to ``finetune_fn`` (default
    :func:`~pyoptim.sparse.tasks.finetune`; any function with its signature, e.g. a fake in tests:
    ``finetune_fn(model, task, scheme, seed=..., steps=..., ...) -> accuracy``).

    ``workers > 1`` runs the fine-tunes in that many processes (``start_method``, one thread
    each; ``finetune_fn`` must then be picklable); ``workers = 1`` runs them here, also with one
    thread, so both give the same numbers. ``cache`` (a JSON path): finished entries are read
    from it and every new one is written to it as it finishes; a cache made for another model,
    task or fine-tune config raises ``ValueError`` naming what differs. Other ``ks``,
    ``candidates``, ``ratios`` or ``seeds`` reuse the entries they share.
    """
    if workers < 1:
        raise ValueError(f"contribution: workers must be >= 1, got {workers}")
    if not seeds:
        raise ValueError("contribution: seeds must name at least one seed")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0 < r <= 1 for r in ratios) or ratios != sorted(set(ratios)):
        raise ValueError(f"contribution: ratios must be increasing levels in (0, 1], got {ratios}")
    candidates = list(default_candidates(model) if candidates is None else candidates)
    pos = conv_positions(model)
    if ks is None:
        ks = range(0, max([pos[c] for c in candidates if c in pos], default=0) + 1)
    entries = _plan(model, ks, candidates, ratios, list(seeds))
    hyper = {"steps": steps, "lr": lr, "batch_size": batch_size, "momentum": momentum,
             "weight_decay": weight_decay}
    identity = json.loads(json.dumps(_identity(model, task, finetune_fn, hyper)))
    path = Path(cache) if cache is not None else None
    results = _load_cache(path, identity) if path is not None else {}
    todo = [e for e in entries if e.key not in results]
    schemes = {e.key: update_scheme(model, e.k, {e.layer: e.ratio} if e.layer else {}) for e in todo}
    if log:
        log(f"contribution: {len(entries)} fine-tunes, {len(entries) - len(todo)} cached, "
            f"{len(todo)} to run on {workers} worker(s)")

    def on_done(e: _Entry, acc: float, seconds: float) -> None:
        results[e.key] = {"accuracy": acc, "seconds": seconds, "k": e.k, "layer": e.layer,
                          "ratio": e.ratio, "seed": e.seed}
        if path is not None:
            _save_cache(path, identity, results)
        if log:
            log(f"contribution: {e.key} acc {acc:.4f} ({seconds:.1f} s)")

    _run_all(todo, schemes, model, task, finetune_fn, hyper, workers, start_method, on_done)
    return _tables(model, entries, results, ratios, list(seeds), identity)


# ---- the search space ------------------------------------------------------------------------

def _interpolate(points: Dict[int, float], k: int) -> float:
    ks = sorted(points)
    if k in points:
        return points[k]
    hi = next(x for x in ks if x > k)
    lo = max(x for x in ks if x < k)
    return points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo)


def _head_model(model: nn.Module, num_classes: int) -> nn.Module:
    m = fuse_bn(copy.deepcopy(model).cpu().float().eval())
    name = _classifier(m)
    old = m.get_submodule(name)
    if num_classes and old.out_features != num_classes:
        parent, _, leaf = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, nn.Linear(old.in_features, num_classes))
    return m


def search_space(model: nn.Module, tables: ContributionTables, input_shape: Sequence[int],
                 batch_size: int, optimizer: str = "sgd_momentum", memory: str = "total"
                 ) -> SearchSpace:
    """The :class:`SearchSpace` of ``tables`` with memory costs from :func:`memory_estimate`.

    ``K = max(tables.ks)``. ``bias_gain[k]`` is the measured gain, linearly interpolated between
    the measured windows; ``bias_memory[k]`` is ``memory_estimate(last k biases + classifier)``
    (key ``memory``, bytes; made non-decreasing by a running maximum, a no-op on MobileNetV2);
    ``weight_memory[i][r]`` is ``memory_estimate(last p_i biases + share r of W_i)`` minus
    ``bias_memory[p_i]``: the weight's extra cost on top of its own smallest window. The model is
    additive; its error on real schemes is measured in tests/test_sparse_contribution.py and
    docs/sparse_update.md. ``model`` is the plain model; it is copied, BN folded and given a head
    of the task's size before estimating."""
    m = _head_model(model, tables.num_classes)
    big_k = max(tables.ks)

    def est(k: int, weights: Dict[str, float]) -> float:
        scheme = update_scheme(m, k, weights) or SparseUpdateScheme()
        return float(memory_estimate(m, scheme, input_shape, batch_size, optimizer)[memory])

    bias_memory, top = [], 0.0
    for k in range(big_k + 1):
        top = max(top, est(k, {}))
        bias_memory.append(top)
    weight_memory = {c: [max(0.0, est(p, {c: r}) - bias_memory[p]) for r in tables.ratios]
                     for c, p in tables.positions.items()}
    bias_gain = [_interpolate(tables.bias_gain, k) for k in range(big_k + 1)]
    return SearchSpace(tables.ratios, bias_gain, bias_memory, dict(tables.positions),
                       {c: list(v) for c, v in tables.weight_gain.items()}, weight_memory)
