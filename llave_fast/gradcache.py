"""Gradient caching: the whole (global) batch as negatives at the memory of one chunk.

One ``GradCache.__call__`` is one training step's backward:

1. forward every chunk of the local batch without grad (RNG state recorded per chunk: the CPU's
   and CUDA's, MPS's or XPU's where in use; another accelerator with dropout active is refused);
2. the loss on the full local batch of embeddings (the loss itself gathers across ranks),
   and its gradient with respect to the embeddings;
3. per chunk, re-forward with grad under the recorded RNG state (so dropout replays) and
   backpropagate the cached embedding gradient into the parameters.

Parameter gradients equal those of one full-batch forward/backward; activation memory is
that of one chunk. About one extra forward over a plain step.

Single pass: when the whole local batch (queries, targets and negatives together) fits in
one chunk on every rank, caching buys no memory, so the first pass runs with grad and keeps
its graph, and the cached gradients are backpropagated through it: the same gradients and
RNG stream, one forward fewer per step (about a third of the step's compute). It applies
when one encoder (not a DDP module, whose gradient hooks expect one forward per backward)
encodes every side; ``single_pass=False`` turns it off.

Across ranks every rank makes the same number of encoder calls in both passes, even with
uneven per-rank batches: under ZeRO-3 each forward gathers the parameters (a collective),
and DDP may broadcast buffers in each forward, so a rank with fewer chunks would leave the
others waiting in a collective it never joins (gloo aborts, NCCL hangs). The chunk counts
(queries, targets, negatives) are agreed by one all-reduce (max), and a rank with fewer
chunks runs extra forwards of one of its own chunks whose output is discarded (first pass)
or whose cached gradient is zero (second pass): they add nothing to the gradients, and run
under a forked RNG so the RNG stream is the same as without them.

Gradient reduction across ranks happens once per step:
* plain module: nothing to do;
* DDP: every chunk but the last runs under ``no_sync()``;
* DeepSpeed engine: every chunk's backward goes through ``engine.backward`` without the
  1/gradient_accumulation_steps scaling; the caller steps the engine once afterwards.

Deferred backward (``defer_backward=True``), for callers that run the backward themselves (the
Hugging Face and sentence-transformers trainers call ``loss.backward()`` on what the loss
returns): steps 1 and 2 run in the call, which returns a loss tensor that requires grad; step 3
runs when that tensor's backward runs, every cached gradient scaled by the gradient that
reaches the loss (so a trainer's 1/accumulation-steps or loss scaling applies to every chunk).
On the single pass the returned loss carries the kept graphs, and its backward goes through
them. Under ``torch.no_grad()`` (evaluation) the call only encodes and returns the loss.
DeepSpeed engines are refused in this mode (each chunk's backward must go through
``engine.backward``, which the caller's backward cannot nest).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Any, Callable

import torch
from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["GradCache", "split_batch"]


def _batch_size(inputs, name: str) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise InvalidArgument(f"{name} must be batch-first, got a 0-d tensor")
        return inputs.shape[0]
    if isinstance(inputs, dict):
        sizes = {k: _batch_size(v, f"{name}[{k!r}]") for k, v in inputs.items() if _is_batched(v)}
        if not sizes:
            raise InvalidArgument(f"{name} has no batch-first tensor or list to split (keys: {list(inputs)})")
        if len(set(sizes.values())) != 1:
            raise InvalidArgument(f"{name} holds batch-first entries of different lengths: {sizes}")
        return next(iter(sizes.values()))
    if isinstance(inputs, (list, tuple)):
        return len(inputs)
    raise InvalidArgumentType(f"{name} must be a tensor, a dict of batch-first tensors/lists, or a list; got {type(inputs).__name__}")


def _is_batched(v) -> bool:
    return (isinstance(v, torch.Tensor) and v.dim() > 0) or isinstance(v, (list, tuple, dict))


def split_batch(inputs, chunk_size: int, name: str = "inputs") -> list:
    """Split batch-first inputs into chunks of ``chunk_size`` samples (``name``: what errors call them).

    Tensors are split along dim 0; lists/tuples by sample (so a list of per-image tile
    tensors with different tile counts splits too); dicts entry by entry; anything else
    (None, strings, numbers, 0-d tensors) is repeated in every chunk.
    """
    n = _batch_size(inputs, name)
    return [_take(inputs, i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]


def _take(x, lo, hi):
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[lo:hi]
    if isinstance(x, dict):
        return {k: _take(v, lo, hi) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(x[lo:hi])
    return x


def _mps_ready() -> bool:
    return torch.backends.mps.is_available()


def _xpu_ready() -> bool:
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available() and xpu.is_initialized()


#: the accelerators whose generators the re-encode replays (besides the CPU's): device type ->
#: (whether its generators are in use, get every device's state, set them). CUDA and XPU only once
#: initialised (reading them would initialise them); MPS (one device) whenever it is available.
_DEVICE_RNGS = {
    "cuda": (lambda: torch.cuda.is_initialized(), lambda: torch.cuda.get_rng_state_all(),
             lambda s: torch.cuda.set_rng_state_all(s)),
    "mps": (_mps_ready, lambda: torch.mps.get_rng_state(), lambda s: torch.mps.set_rng_state(s)),
    "xpu": (_xpu_ready, lambda: torch.xpu.get_rng_state_all(), lambda s: torch.xpu.set_rng_state_all(s)),
}
#: devices that draw no random numbers of their own
_NO_RNG_DEVICES = {"cpu", "meta"}


class _RngState:
    """The CPU's generator state and every accelerator's of :data:`_DEVICE_RNGS` in use."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.devices = {dev: get() for dev, (ready, get, _set) in _DEVICE_RNGS.items() if ready()}

    def restore(self):
        torch.set_rng_state(self.cpu)
        for dev, state in self.devices.items():
            _DEVICE_RNGS[dev][2](state)

    @contextlib.contextmanager
    def replay(self):
        """Run the block under the recorded states, then put back the states found on entry."""
        now = _RngState()
        self.restore()
        try:
            yield
        finally:
            now.restore()


def _device_types(x, out: set) -> set:
    """The device types of the tensors in ``x`` (nested dicts, lists and tuples)."""
    if isinstance(x, torch.Tensor):
        out.add(x.device.type)
    elif isinstance(x, dict):
        for v in x.values():
            _device_types(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _device_types(v, out)
    return out


def _active_dropout(encoder) -> list[str]:
    """The names of the encoder's dropout layers that draw random numbers now (training mode, p > 0)."""
    if not isinstance(encoder, torch.nn.Module):
        return []
    return [name or type(m).__name__ for name, m in encoder.named_modules()
            if isinstance(m, (torch.nn.modules.dropout._DropoutNd, torch.nn.AlphaDropout)) and m.training
            and m.p > 0]


def _unreplayable_devices(encoder, chunks) -> list[str]:
    """The device types of the encoder's parameters and the inputs whose generator :class:`_RngState`
    does not record."""
    devices = set()
    for chunk in chunks:
        _device_types(chunk, devices)
    if isinstance(encoder, torch.nn.Module):
        devices.update(p.device.type for p in encoder.parameters())
    return sorted(devices - _NO_RNG_DEVICES - set(_DEVICE_RNGS))


def _replay_refusal(encoder, chunks, side: str) -> str | None:
    """Why a re-encode's random draws cannot be replayed, or None: the encoder's parameters or the
    inputs on a device whose generator :class:`_RngState` does not record, with dropout active (its
    masks would differ between the two passes, and the gradients with them, silently). Every rank
    raises it (``GradCache.__call__``): one alone would leave the others in a collective."""
    unknown = _unreplayable_devices(encoder, chunks)
    dropout = _active_dropout(encoder) if unknown else []
    if not dropout:
        return None
    return (f"GradCache cannot replay the random number generator of device {', '.join(unknown)} (the {side} "
            f"encoder's parameters or inputs are there): the re-encode would draw other dropout masks than the "
            f"first pass in {', '.join(dropout[:3])}{' ...' if len(dropout) > 3 else ''}, and the gradients "
            "would be wrong. Put the encoder in eval mode or set the dropout to 0, take the single pass "
            "(chunk_size holding the whole batch), or train on cpu, cuda, mps or xpu")


def _warn_unreplayable(encoder, chunks, side: str) -> None:
    """Without a dropout layer found (:func:`_replay_refusal` refuses one), a warning: an encoder in
    training mode may draw random numbers by other means."""
    unknown = _unreplayable_devices(encoder, chunks)
    if not unknown or isinstance(encoder, torch.nn.Module) and not encoder.training:
        return
    warnings.warn(
        f"GradCache cannot replay the random number generator of device {', '.join(unknown)} (the {side} "
        "encoder's parameters or inputs are there); no active dropout layer was found, but any other random "
        "draw in the encoder's forward would differ between the two passes and make the gradients wrong",
        stacklevel=3)


class _AutocastState:
    """Whether autocast is on, and in which dtype, for the CPU and CUDA, as at the first pass: the
    deferred re-encode runs in the caller's backward, which AMP recipes run outside autocast."""

    def __init__(self):
        self.state = {dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda")}

    @contextlib.contextmanager
    def replay(self):
        with contextlib.ExitStack() as stack:
            for dev, (on, dtype) in self.state.items():
                stack.enter_context(torch.autocast(dev, dtype=dtype, enabled=on))
            yield


def _norm_layers(encoders) -> list:
    """The layers with running statistics (BatchNorm, InstanceNorm with track_running_stats) of the
    encoders that are modules (a DeepSpeed engine's or DDP's module included)."""
    from torch.nn.modules.batchnorm import _NormBase

    seen, out = set(), []
    for enc in encoders:
        if not isinstance(enc, torch.nn.Module):
            continue
        for m in enc.modules():
            if isinstance(m, _NormBase) and m.track_running_stats and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


@contextlib.contextmanager
def _running_stats_kept(layers):
    """Calls that repeat a forward already counted (the re-encode, a padding call) leave the running
    statistics as they were: each sample updates them once, as in one full-batch forward."""
    saved = [[(b, b.detach().clone()) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
              if b is not None] for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for buf, old in pairs:
                    buf.copy_(old)


def _graph_leaves(loss: torch.Tensor, exclude) -> list:
    """The tensors that require grad and that ``loss``'s graph ends in (a learnable logit scale, the
    loss's own parameters), other than ``exclude`` (the embeddings)."""
    excluded = {id(x) for x in exclude}
    seen, out, stack = set(), [], [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf
        if var is not None:
            if id(var) not in excluded and all(var is not x for x in out):
                out.append(var)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return out


def _is_deepspeed_engine(model) -> bool:
    return all(hasattr(model, a) for a in ("backward", "step", "zero_optimization_stage", "module"))


class GradCache:
    """``GradCache(encoder, loss_fn, chunk_size)(query_inputs, target_inputs) -> loss``.

    encoder: module or callable, ``encoder(chunk) -> (n, d)`` embeddings (a DDP module or a
        DeepSpeed engine is recognised and handled, see the module docstring).
    loss_fn: e.g. ``FusedHardnessLoss``; called once as ``loss_fn(q, t, **loss_kwargs)`` on
        the whole local batch of embeddings.
    chunk_size: samples per forward with grad (activation memory is that of one chunk).
    target_encoder: optional separate encoder for the targets (default: ``encoder``).
    split: optional ``split(inputs, chunk_size) -> list of chunks`` for custom batches.
    progress: show a tqdm bar over the chunks.
    equalize_chunks: make the chunk counts equal across ranks (see the module docstring).
        None (default): whenever torch.distributed is initialised with more than one rank.
    process_group: the ranks that must agree (default: the loss's ``process_group`` if it
        has one, else the world).
    single_pass: take the single pass (one forward with grad, no re-forward) when the whole
        local batch fits in one chunk on every rank (see the module docstring). Default True.
    defer_backward: False (default): the call runs the whole step's backward and returns the
        loss detached. True: the call returns a loss tensor whose backward runs the cached
        re-encode (see the module docstring), for trainers that call ``loss.backward()``.
    count: optional ``count(chunk) -> samples in it``, for a custom ``split`` whose chunks are
        not plain batch-first containers (default: their batch-first length).

    After a call with grad enabled, ``last_pass`` says which path it took: ``"single"`` (one forward
    with grad) or ``"cached"`` (encode without grad, then the re-encode); None before one.
    """

    def __init__(
        self,
        encoder: Callable,
        loss_fn: Callable,
        chunk_size: int,
        *,
        target_encoder: Callable | None = None,
        split: Callable[[Any, int], list] | None = None,
        progress: bool = False,
        equalize_chunks: bool | None = None,
        process_group=None,
        single_pass: bool = True,
        defer_backward: bool = False,
        count: Callable[[Any], int] | None = None,
    ):
        if not isinstance(single_pass, bool):
            raise InvalidArgumentType(f"single_pass must be True or False, got {single_pass!r}")
        if not isinstance(defer_backward, bool):
            raise InvalidArgumentType(f"defer_backward must be True or False, got {defer_backward!r}")
        if count is not None and not callable(count):
            raise InvalidArgumentType(f"count must be a callable count(chunk) -> int or None, got {type(count).__name__}")
        for name, fn in (("encoder", encoder), ("loss_fn", loss_fn), ("target_encoder", target_encoder),
                         ("split", split)):
            if fn is not None and not callable(fn) or fn is None and name in ("encoder", "loss_fn"):
                raise InvalidArgumentType(f"{name} must be callable, got {type(fn).__name__} {fn!r:.60}")
        if not isinstance(progress, bool):
            raise InvalidArgumentType(f"progress must be True or False, got {progress!r}")
        if hasattr(chunk_size, "__index__") and not isinstance(chunk_size, bool):
            chunk_size = operator.index(chunk_size)  # numpy integers too
        self.single_pass = single_pass
        self.defer_backward = defer_backward
        self.last_pass: str | None = None  # "single" or "cached": the path the last call with grad took
        self._count_fn = count
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
            raise InvalidArgumentType(f"chunk_size must be a positive int, got {type(chunk_size).__name__} "
                                      f"{chunk_size!r}")
        if chunk_size < 1:
            raise InvalidArgument(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoder = encoder
        self.target_encoder = target_encoder if target_encoder is not None else encoder
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.split = split or split_batch
        self.progress = progress
        if equalize_chunks not in (None, True, False):
            raise InvalidArgumentType(f"equalize_chunks must be None, True or False, got {equalize_chunks!r}")
        self.equalize_chunks = equalize_chunks
        self.process_group = process_group if process_group is not None else getattr(loss_fn, "process_group", None)
        # distinct DeepSpeed engines (one shared encoder, or separate query/target ones)
        self._engines = []
        for m in (self.encoder, self.target_encoder):
            if _is_deepspeed_engine(m) and all(m is not e for e in self._engines):
                self._engines.append(m)
        if defer_backward and self._engines:
            raise InvalidArgument(
                "defer_backward=True runs the re-encode inside the caller's backward, but a DeepSpeed engine "
                "needs engine.backward for every chunk: use defer_backward=False with a DeepSpeed engine "
                f"(got encoder {type(self._engines[0]).__name__})"
            )
        for engine in self._engines:
            if engine.gradient_accumulation_steps() != 1:
                raise InvalidArgument(
                    "GradCache is the gradient accumulation: build the DeepSpeed engine with "
                    f"gradient_accumulation_steps=1 (got {engine.gradient_accumulation_steps()}); "
                    "grow the batch and the chunk count instead"
                )

    # ------------------------------------------------------------------------------
    def _embed_no_grad(self, encoder, chunks, bar, n_pad=0, pad_chunk=None, side="query"):
        embs, states = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_RngState())
                embs.append(self._check_emb(encoder(chunk), len(embs), self._rows(chunk, side), side))
                bar.update(1)
            for _ in range(n_pad):
                # another rank has more chunks: join its collectives, keep nothing (not even running statistics)
                with _RngState().replay(), _running_stats_kept(_norm_layers([encoder])):
                    encoder(pad_chunk)
                bar.update(1)
        return embs, states

    def _embed_sides(self, chunks, bar, pads, pad_with):
        """The first pass over the three sides (query, target, negatives): each side's
        ``(embeddings, RNG states)``, with that side's padding calls."""
        encoders = (self.encoder, self.target_encoder, self.target_encoder)
        return [self._embed_no_grad(enc, c, bar, n_pad, (pad or [None])[0], side)
                for enc, c, n_pad, pad, side in zip(encoders, chunks, pads, pad_with, ("query", "target", "negative"))]

    def _chunk_targets(self, counts: list[int], fits: bool = False,
                       stops: list[bool] = (False, False)) -> tuple[list[int], bool, list[bool]]:
        """(the chunk counts every rank uses: the max over ranks, where that is needed; whether
        every rank takes the single pass: ``fits`` on every rank and equal counts everywhere;
        for each of this rank's ``stops``, whether any rank has it: [an empty batch, no query or no
        target chunk; a re-encode it cannot replay]). One all-reduce carries them all."""
        import torch.distributed as dist

        on = self.equalize_chunks
        stops = [bool(x) for x in stops]
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return counts, fits, stops
        if on is False:  # the ranks are not to be coordinated: a single pass could unbalance the calls
            return counts, False, stops
        from .distributed import collective_device

        group = self.process_group
        dev = collective_device(group)
        # max of the counts, max of their negatives (-min), whether any rank does not fit, whether any has each stop
        t = torch.tensor(counts + [-c for c in counts] + [0 if fits else 1] + [int(x) for x in stops],
                         dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        t = [int(x) for x in t.tolist()]
        k = len(counts)
        high, low = t[:k], [-x for x in t[k : 2 * k]]
        return high, t[2 * k] == 0 and high == low, [bool(x) for x in t[2 * k + 1:]]

    def _fits_one_pass(self, sizes: list[int]) -> bool:
        """Whether this rank's whole batch can take the single pass (see the module docstring)."""
        enc = self.encoder
        ddp_like = hasattr(enc, "no_sync") and not _is_deepspeed_engine(enc)
        return (self.single_pass and enc is self.target_encoder and not ddp_like
                and sizes[0] > 0 and sum(sizes) <= self.chunk_size)

    @staticmethod
    def _check_emb(e, i, n: int | None = None, side: str = "query"):
        if not isinstance(e, torch.Tensor) or e.dim() != 2:
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise InvalidArgument(f"encoder must return (n, d) embeddings; {side} chunk {i} gave {got}")
        if n is not None and e.shape[0] != n:
            raise InvalidArgument(f"encoder must return one embedding per sample: {side} chunk {i} holds {n} "
                                  f"samples but gave {e.shape[0]} rows (shape {tuple(e.shape)})")
        return e

    def _rows(self, chunk, side: str) -> int | None:
        """The rows the encoder must return for ``chunk``: known for the default split or a given
        ``count`` (a custom split's chunks, tuples say, may have a length that is no sample count)."""
        if self.split is split_batch or self._count_fn is not None:
            return self._count(chunk, f"{side} chunk")
        return None

    def _split(self, inputs, name: str) -> list:
        if self.split is split_batch:
            return split_batch(inputs, self.chunk_size, name)
        return self.split(inputs, self.chunk_size)

    def _call_loss(self, leaves, loss_kwargs) -> torch.Tensor:
        """The loss on the whole batch's embeddings, checked to be a scalar with a graph."""
        if leaves[2] is not None:
            loss_kwargs["negatives"] = leaves[2]
        loss = self.loss_fn(leaves[0], leaves[1], **loss_kwargs)
        if isinstance(loss, dict):
            loss = loss["contrastive_loss"]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InvalidArgument(f"loss_fn must return the loss as a one-element tensor (or a dict with "
                                  f"'contrastive_loss'), got {got}")
        if not loss.requires_grad and torch.is_grad_enabled():
            raise InvalidArgument("loss_fn returned a loss without a graph to the embeddings (detached?): "
                                  "GradCache needs its gradient with respect to them")
        return loss

    def _loss_grads(self, leaves, loss_kwargs):
        """(the loss, its gradient for each given embedding leaf, the loss's own leaves that require
        grad, their gradients). The call's backward: the loss's own leaves (a learnable logit scale)
        get their gradient at once. Deferred: nothing is accumulated here; the returned tensor's
        backward hands them theirs, scaled by the gradient that reaches the loss."""
        loss = self._call_loss(leaves, loss_kwargs)
        used = [x for x in leaves if x is not None]
        own = _graph_leaves(loss, used) if self.defer_backward else []
        if self.defer_backward:
            grads = torch.autograd.grad(loss, used + own, allow_unused=True)
        else:
            loss.backward()
            grads = [x.grad for x in used]
        # a loss that ignores a side (no gradient): its chunks backpropagate zeros
        emb_grads = [torch.zeros_like(x) if g is None else g for x, g in zip(used, grads[:len(used)])]
        own_grads = [torch.zeros_like(x) if g is None else g for x, g in zip(own, grads[len(used):])]
        it = iter(emb_grads)
        return loss, [next(it) if x is not None else None for x in leaves], own, own_grads

    def _count(self, chunk, name: str) -> int:
        if self._count_fn is None:
            return _batch_size(chunk, name)
        n = self._count_fn(chunk)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"count must return a sample count (int >= 0) for a {name}, got {n!r}")
        return n

    def _sync_context(self, encoder, last: bool):
        if not last and hasattr(encoder, "no_sync") and not _is_deepspeed_engine(encoder):
            return encoder.no_sync()
        return contextlib.nullcontext()

    def __call__(self, query_inputs, target_inputs, negative_inputs=None, **loss_kwargs) -> torch.Tensor:
        """One step's forward and backward; returns the loss (detached). With
        ``defer_backward=True``: the forward, and a loss whose backward is the step's backward.

        negative_inputs: optional hard-negative target inputs (any count), encoded with the
            target encoder and passed to the loss as ``negatives=``.
        """
        if not torch.is_grad_enabled() and not self.defer_backward:
            raise InvalidArgument(
                "GradCache(defer_backward=False) runs the step's backward, which needs grad mode, but it was called "
                "under torch.no_grad() or torch.inference_mode(): call it with grad enabled, or build it with "
                "defer_backward=True, which only encodes and returns the loss there")
        q_chunks = self._split(query_inputs, "query_inputs")
        t_chunks = self._split(target_inputs, "target_inputs")
        n_chunks = [] if negative_inputs is None else self._split(negative_inputs, "negative_inputs")
        n_q = sum(self._count(c, "query chunk") for c in q_chunks)
        n_t = sum(self._count(c, "target chunk") for c in t_chunks)
        if n_q != n_t:
            raise InvalidArgument(f"query_inputs has {n_q} samples but target_inputs has {n_t}: they must pair up")
        n_n = sum(self._count(c, "negative chunk") for c in n_chunks)
        grad_wanted = torch.is_grad_enabled()
        empty = not (q_chunks and t_chunks)
        # a re-encode whose random draws cannot be replayed here: refused below by every rank, since this rank
        # alone would leave the others in their encoders' and the loss's collectives
        refusal = (_replay_refusal(self.encoder, q_chunks, "query")
                   or _replay_refusal(self.target_encoder, t_chunks + n_chunks, "target")) if grad_wanted else None
        want, single, (any_empty, any_refusal) = self._chunk_targets(
            [len(q_chunks), len(t_chunks), len(n_chunks)], grad_wanted and self._fits_one_pass([n_q, n_t, n_n]),
            [empty, refusal is not None])
        if not any(want[:2]):
            raise InvalidArgument("GradCache: query_inputs and target_inputs are empty on every rank: nothing to encode")
        if single:
            self.last_pass = "single"
            return self._single_pass(q_chunks, t_chunks, n_chunks, loss_kwargs)
        pads = [w - len(c) for w, c in zip(want, (q_chunks, t_chunks, n_chunks))]
        if any_empty:  # every rank raises (one alone would leave the others in a collective)
            raise InvalidArgument(
                f"GradCache: {'this rank' if empty else 'another rank'} has an empty batch while other ranks have "
                "chunks to encode; every rank needs at least one query and one target (its encoder calls join the "
                "other ranks' collectives)"
            )
        # a rank without negatives pads its negative calls with a target chunk (same encoder)
        pad_with = [q_chunks[:1], t_chunks[:1], (n_chunks or t_chunks)[:1]]
        if not grad_wanted:
            return self._loss_only(q_chunks, t_chunks, n_chunks, pads, pad_with, loss_kwargs)
        # the re-encode replays the first pass's random draws: refused where it cannot, on every rank
        if any_refusal:
            raise InvalidArgument(refusal or (
                "GradCache: another rank cannot replay the random number generator of its encoder's device with "
                "dropout active (its own error names the device and the layers): the re-encode's gradients would "
                "be wrong there, so every rank stops"))
        _warn_unreplayable(self.encoder, q_chunks, "query")
        _warn_unreplayable(self.target_encoder, t_chunks + n_chunks, "target")
        self.last_pass = "cached"
        total = sum(want) if self.defer_backward else 2 * sum(want)
        bar = _progress(total, self.progress)
        autocast = _AutocastState()
        try:
            (q_embs, q_states), (t_embs, t_states), (n_embs, n_states) = self._embed_sides(
                (q_chunks, t_chunks, n_chunks), bar, pads, pad_with)
            leaves = [torch.cat(e).detach().requires_grad_() if e else None for e in (q_embs, t_embs, n_embs)]
            loss, (q_grad, t_grad, n_grad), own, own_grads = self._loss_grads(leaves, loss_kwargs)
            # the RNG as after one full-batch forward and the loss (whose own draws are not rewound)
            rng_after_loss = _RngState()
            q_grads = q_grad.split([e.shape[0] for e in q_embs])
            t_grads = t_grad.split([e.shape[0] for e in t_embs])
            n_grads = n_grad.split([e.shape[0] for e in n_embs]) if n_grad is not None else []

            jobs = []
            streams = [(self.encoder, q_chunks, q_states, q_grads), (self.target_encoder, t_chunks, t_states, t_grads),
                       (self.target_encoder, n_chunks, n_states, n_grads)]
            for (enc, chunks, states, grads), n_pad, pad in zip(streams, pads, pad_with):
                jobs += [(enc, c, s, g) for c, s, g in zip(chunks, states, grads)]
                # padding calls (zero cached gradient): the same count and order on every rank
                jobs += [(enc, pad[0], None, None)] * n_pad
            if self.defer_backward:
                # step 3 runs in the caller's backward, under the first pass's autocast; every replay runs
                # under a forked RNG, so the RNG already continues as after one full-batch forward
                def second_pass(grad_out):
                    second_bar = _progress(len(jobs), self.progress)
                    try:
                        with torch.enable_grad(), autocast.replay():
                            self._second_pass(jobs, second_bar, grad_out)
                    finally:
                        second_bar.close()

                anchor = torch.zeros((), device=loss.device, requires_grad=True)
                return _DeferredSecondPass.apply(loss.detach(), second_pass, tuple(own_grads), anchor, *own)
            self._second_pass(jobs, bar)
            rng_after_loss.restore()
        finally:
            bar.close()
        return loss.detach()

    def _second_pass(self, jobs, bar, grad_out=None):
        """Re-encode every chunk with grad under its recorded RNG state and backpropagate its
        cached embedding gradient (times ``grad_out``, the loss's own gradient, when deferred)."""
        # each encoder's gradients are reduced once, on its own last chunk
        last_of = {id(enc): k for k, (enc, *_rest) in enumerate(jobs)}
        # the first pass counted every sample in the running statistics (BatchNorm) already
        with self._one_reduction(), _running_stats_kept(_norm_layers({id(j[0]): j[0] for j in jobs}.values())):
            for k, (encoder, chunk, state, grad) in enumerate(jobs):
                last = k == last_of[id(encoder)]
                replay = (state or _RngState()).replay()
                with self._sync_context(encoder, last), replay:
                    emb = encoder(chunk)
                    if grad is not None and (not isinstance(emb, torch.Tensor) or emb.shape != grad.shape):
                        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                        raise InvalidArgument(
                            f"GradCache: the encoder gave {got} when re-encoding a chunk that gave shape "
                            f"{tuple(grad.shape)} in the first pass; it must return the same embeddings for the same "
                            "chunk in both passes (an encoder whose outputs change between calls is not supported, "
                            "e.g. sentence-transformers' MatryoshkaLoss or AdaptiveLayerLoss around a cached loss)")
                    if grad is None:
                        surrogate = (emb * 0).sum()  # a padding call: joins the collectives, adds 0
                    else:
                        if grad_out is not None:
                            grad = grad * grad_out.to(grad.dtype)
                        # d(sum(emb * cached_grad))/d(emb) = cached_grad: backprop the cached gradient
                        surrogate = (emb * grad.to(emb.dtype)).sum()
                    # an encoder with nothing trainable behind it (frozen, inputs without grad): no graph
                    if surrogate.requires_grad or _is_deepspeed_engine(encoder):
                        self._backward(encoder, surrogate, last)
                bar.update(1)

    def _loss_only(self, q_chunks, t_chunks, n_chunks, pads, pad_with, loss_kwargs) -> torch.Tensor:
        """No gradient wanted (``defer_backward=True`` under ``torch.no_grad()``): encode every chunk
        (with the same padding calls as a training step) and return the loss."""
        bar = _progress(len(q_chunks) + len(t_chunks) + len(n_chunks) + sum(pads), self.progress)
        try:
            embs = [e for e, _ in self._embed_sides((q_chunks, t_chunks, n_chunks), bar, pads, pad_with)]
            loss = self._call_loss([torch.cat(e) if e else None for e in embs], loss_kwargs)
        finally:
            bar.close()
        return loss.detach()

    def _single_pass(self, q_chunks, t_chunks, n_chunks, loss_kwargs) -> torch.Tensor:
        """The whole batch in one chunk: forward with grad once, the loss on detached copies of
        the embeddings (as in the cached path), then its gradient backpropagated through the
        kept graphs in one backward (with ``defer_backward``: in the caller's backward).

        The default split gives at most one chunk per side here; a custom split may give more
        (e.g. one per column of hard negatives): a side's chunks are concatenated for the loss."""
        encoder = self.encoder
        bar = _progress(len(q_chunks) + len(t_chunks) + len(n_chunks), self.progress)
        try:
            with self._one_reduction():
                sides = []
                for chunks, side in zip((q_chunks, t_chunks, n_chunks), ("query", "target", "negative")):
                    embs = []
                    for chunk in chunks:
                        embs.append(self._check_emb(encoder(chunk), len(embs), self._rows(chunk, side), side))
                        bar.update(1)
                    sides.append(embs)
                leaves = [(e[0].detach() if len(e) == 1 else torch.cat([x.detach() for x in e])).requires_grad_()
                          if e else None for e in sides]
                loss, leaf_grads, own, own_grads = self._loss_grads(leaves, loss_kwargs)
                embs, grads = [], []
                for side, grad in zip(sides, leaf_grads):
                    if grad is not None:
                        embs += side
                        grads += list(grad.split([e.shape[0] for e in side]))
                # a frozen encoder's embeddings have no graph: nothing to backpropagate into
                kept = [(e, g) for e, g in zip(embs, grads) if e.requires_grad]
                if self.defer_backward:
                    return _ScaledGrads.apply(loss.detach(), tuple(g for _, g in kept) + tuple(own_grads),
                                              *(e for e, _ in kept), *own)
                if kept or _is_deepspeed_engine(encoder):
                    surrogate = sum((e * g.to(e.dtype)).sum() for e, g in kept) if kept else (embs[0] * 0).sum()
                    self._backward(encoder, surrogate, True)
        finally:
            bar.close()
        return loss.detach()

    @contextlib.contextmanager
    def _one_reduction(self):
        """DeepSpeed: all chunks' backward passes, then one gradient reduction per engine."""
        with contextlib.ExitStack() as stack:
            for engine in self._engines:
                if engine.zero_optimization_stage() > 0:
                    # ZeRO 1/2/3: grads stay local on the params until the block exits, then one
                    # reduction fills the partitions that engine.step() uses
                    stack.enter_context(engine.coalesce_grad_reduction())
                else:
                    # no ZeRO: the engine all-reduces in the backward at the accumulation
                    # boundary, which _backward sets for the engine's last chunk only
                    stack.callback(engine.set_gradient_accumulation_boundary, True)
            yield

    def _backward(self, encoder, surrogate, last: bool):
        if _is_deepspeed_engine(encoder):
            if encoder.zero_optimization_stage() == 0:
                encoder.set_gradient_accumulation_boundary(last)
            # no 1/GAS scaling: the chunks together are one sample's worth of gradient
            encoder.backward(surrogate, scale_wrt_gas=False)
        else:
            surrogate.backward()


class _DeferredSecondPass(torch.autograd.Function):
    """The loss value, tied to the graph by a leaf of its own (``anchor``) and by the loss's own
    leaves (a learnable logit scale): its backward runs GradCache's second pass (the cached
    re-encode) and hands each own leaf its gradient, all scaled by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, value, second_pass, own_grads, anchor, *own):  # noqa: ARG004 - anchor and own tie the output
        ctx.second_pass, ctx.own_grads = second_pass, own_grads
        # saved only to be freed by a backward without retain_graph: a second backward then fails as a plain
        # graph's does, instead of re-encoding again and adding every gradient a second time
        ctx.save_for_backward(value)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.saved_tensors  # noqa: B018 - raises on a second backward through a freed graph
        ctx.second_pass(grad_out)
        return (None, None, None, None, *[g * grad_out.to(g.dtype) for g in ctx.own_grads])


class _ScaledGrads(torch.autograd.Function):
    """The loss value, tied to its inputs (the single pass's kept embedding graphs, the loss's own
    leaves): its backward hands each input its gradient from the loss times the loss's incoming
    gradient, and autograd carries on into the encoder."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):  # noqa: ARG004 - inputs are the graph's
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        return (None, None, *[(g * grad_out.to(g.dtype)) for g in ctx.grads])


def _progress(total: int, enabled: bool):
    """A tqdm bar over the chunks; with ``enabled`` False, tqdm's own silent bar (``disable=True``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="gradcache chunks", unit="chunk", leave=False, disable=not enabled)
