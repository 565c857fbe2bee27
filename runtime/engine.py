"""The copy engine and executor: one phase's schedule, op by op, each on its stream, in list order.

The schedule's op list is the contract (planner/schedule.py): the executor issues ops in list order; an op waits
for its dependencies, then runs on its stream. Streams are FIFO:
  compute              the issuing thread itself (on CUDA, the current stream): forward, backward, recompute,
                       evict, and the optimizer step when the state lives on the device;
  h2d, d2h             one worker thread each; on CUDA each issues onto its own torch.cuda.Stream with
                       non_blocking copies from pinned memory, and waits for GPU work with stream.wait_event;
  nvme_read/nvme_write one worker thread each, doing file I/O through pinned staging buffers;
  cpu_opt              one worker thread: AdamW on the host;
  net                  one worker thread issuing the data-parallel collectives (runtime.reducer) in list order, so
                       every rank issues the same sequence; on CUDA under its own torch.cuda.Stream.
A dependency is a Done: a future that resolves when the op has been issued (CUDA streams) or has finished
(host work, and every op without CUDA), carrying the CUDA event recorded after the op's GPU work, if any. GPU
streams wait on events without blocking the host; host threads wait with event.synchronize(). There is no
device-wide synchronize in a step: the step ends with the compute stream waiting on the copy streams.

Without CUDA the same code runs with the CPU standing in for the device: transfers are copies done by the
worker threads, and every Done resolves when the work is finished.

Chaos mode (tests): BLOCKFIT_CHAOS=seed[:max_ms] (or Executor(chaos=...)) delays the start and the completion of
every op by a seeded random 0..max_ms (default 2 ms). The CPU threads then reorder the way CUDA streams can, so a
missing dependency or a skipped wait shows on the CPU as wrong numbers or an error, not only on a GPU.

What each op does is PhaseOps's business: one method per op kind, for one phase (one active block).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from planner.costs import STREAMS
from planner.errors import UserError
from planner.memory import Tier
from planner.schedule import role
from runtime.activations import ComputeOps, HostBuffers, Rec
from runtime.optim import BlockOptimizer
from runtime.store import FlatLayout, Target, TieredStore, bind

# The schedule's streams: the cost model's, and the network's collectives (planner.schedule's `net` ops)
RUNTIME_STREAMS = STREAMS + (() if "net" in STREAMS else ("net",))


class Streams:
    def __init__(self, target: Target):
        self.target = target
        self.workers = {n: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"blockfit-{n}")
                        for n in RUNTIME_STREAMS[1:]}
        self.cuda: dict[str, torch.cuda.Stream] = {}
        if target.cuda:
            self.cuda = {"compute": torch.cuda.current_stream(target.device),
                         "h2d": torch.cuda.Stream(target.device), "d2h": torch.cuda.Stream(target.device),
                         "net": torch.cuda.Stream(target.device)}

    def gpu(self, name: str):
        """The CUDA stream behind a schedule stream, or None (host work, or no CUDA)."""
        return self.cuda.get(name)

    def join_copies(self) -> None:
        """End of a step, GPU-side only: whatever any stream does next comes after all the step's work (the
        next step's first loads read host buffers this step's writebacks fill)."""
        if self.cuda:
            compute = self.cuda["compute"]
            others = [s for name, s in self.cuda.items() if name != "compute"]
            for s in others:
                compute.wait_stream(s)
            for s in others:
                s.wait_stream(compute)

    def close(self) -> None:
        for w in self.workers.values():
            w.shutdown(wait=True)


def _resolved(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class Executor:
    """Runs an op list with a handler that knows what each op does (execute) and what it books (book)."""

    def __init__(self, streams: Streams, tracer, *, chaos: str | None = None):
        self.streams = streams
        self.tracer = tracer
        chaos = os.environ.get("BLOCKFIT_CHAOS") if chaos is None else chaos
        self.chaos = _parse_chaos(chaos) if chaos else None   # (seed, max seconds) or None
        self.runs = 0

    def run(self, ops, handler, *, carried: dict[int, Future] | None = None, ahead=(), ahead_ctx=None) -> dict:
        """Issue `ops` in order and wait for all of them. `ahead`: dependency-free ops of the *next* run (the
        next step's first NVMe reads) issued once this run's ops are, so they overlap this step's tail; their
        futures come back and go in as the next run's `carried`, which it uses instead of issuing them again."""
        carried = dict(carried or {})
        self.runs += 1
        done: dict[int, Future] = {}
        early: dict[int, Future] = {}
        pending: list[Future] = []
        order = list(ops)   # the schedule's order and dependencies, as they are: nothing is re-derived here
        # the early reads queue behind this run's last op on their stream, so they start as soon as it is done
        after = max((k for k, op in enumerate(order) if any(op.stream == a.stream for a in ahead)), default=-1)
        try:
            for k, op in enumerate(order):
                if op.id in carried:
                    done[op.id] = carried.pop(op.id)
                    pending.append(done[op.id])
                elif op.stream == "compute":
                    deps = [done[d] for d in op.deps]
                    done[op.id] = _resolved(self._call(op, deps, handler))
                    handler.book(op)
                else:
                    deps = [done[d] for d in op.deps]
                    handler.book(op)  # every size it needs is known once the earlier compute ops ran
                    done[op.id] = self.streams.workers[op.stream].submit(self._call, op, deps, handler)
                    pending.append(done[op.id])
                if k == after or (k == len(order) - 1 and not early):
                    early = {a.id: self.streams.workers[a.stream].submit(self._call, a, [], handler, ahead_ctx)
                             for a in ahead}
        except BaseException:
            handler.abort()  # wake workers blocked on a staging buffer that will never come back
            raise
        finally:
            errors = []
            for f in pending:
                try:
                    f.result()
                except Exception as e:  # re-raised below, once every worker has stopped
                    errors.append(e)
            self.streams.join_copies()
        if errors:  # a worker's UserError (disk full, a scratch file gone) first: it says what went wrong
            raise next((e for e in errors if isinstance(e, UserError)), errors[0])
        return early

    def _delay(self, op, when: str) -> None:
        """Chaos mode: sleep a seeded random time, the same for the same op, run and moment in every run."""
        if self.chaos is not None:
            seed, most = self.chaos
            time.sleep(random.Random(f"{seed}:{self.runs}:{op.id}:{when}").uniform(0.0, most))

    def _call(self, op, deps, handler, ctx=None):
        gpu = self.streams.gpu(op.stream)
        self._delay(op, "start")
        for d in deps:
            event = d.result()
            if event is not None:
                if gpu is not None:
                    gpu.wait_event(event)
                else:
                    event.synchronize()
        on_stream = torch.cuda.stream(gpu) if gpu is not None else contextlib.nullcontext()
        with on_stream:
            token = self.tracer.begin(gpu)
            try:
                handler.execute(op, gpu)
            except BaseException:
                handler.abort()  # nothing will give its staging buffer back: wake the ops waiting for one
                raise
            self.tracer.end(op, token, gpu, handler.moved_bytes(op), ctx)
            self._delay(op, "done")  # what waits for this op waits longer
            if gpu is None:
                return None
            event = torch.cuda.Event()
            event.record(gpu)
            return event


def _parse_chaos(text: str) -> tuple[int, float]:
    seed, _, most_ms = str(text).partition(":")
    return int(seed), float(most_ms or 2.0) / 1000.0


class PhaseOps(ComputeOps):
    """What each op of one phase does (execute) and what device bytes it books (book), measured, in issue order.
    The compute ops (forward, recompute, backward) and the activation transfers are ComputeOps's."""

    def __init__(self, *, plan, phase, layers, layouts: list[FlatLayout], store: TieredStore, optim: BlockOptimizer,
                 act_buffers: HostBuffers, streams: Streams, track_temporaries: bool = True, reducer=None):
        self.plan, self.phase = plan, phase
        self.reducer = reducer                             # runtime.reducer.Reducer on a world of 2+, else None
        self.layers, self.layouts, self.store, self.optim = layers, layouts, store, optim
        self.act_buffers, self.streams = act_buffers, streams
        self.target: Target = store.target
        self.track_temporaries = track_temporaries and not self.target.cuda
        self.transient: dict[int, int] = {}                # compute op id -> kernel temporaries (first step)
        self.roles = [role(plan, phase.block, i) for i in range(plan.n_layers)]
        self.first = plan.blocks[phase.block].first
        self.head = plan.n_layers - 1
        self.grad_accum = plan.shape.grad_accum
        self.load_of = _load_ids(phase.ops)
        self.bound: dict[int, torch.Tensor] = {i: store.resident(i) for i, t in enumerate(store.tiers) if t == Tier.GPU}
        self.scratch: dict[int, torch.Tensor] = {}         # host copies of device-updated weights bound for NVMe
        self.staged: dict[int, torch.Tensor] = {}          # read op id -> staging buffer (may span two steps)
        self.new_shards: dict[int, torch.Tensor] = {}      # sharded state: this rank's updated weights, to gather

        self._clear()

    def begin_step(self, tokens: list[torch.Tensor], labels: list[torch.Tensor], lr: float) -> None:
        self.tokens, self.labels, self.lr = tokens, labels, lr
        self._clear()
        self.optim.begin_step(loss=self.loss)  # accumulated in place by the forwards
        if self.reducer is not None:  # the device-tier trained layers: their .grad are views of one bucket
            self.reducer.zero()
            for i in self.reducer.flat:
                self.reducer.attach(i, self._params(i))   # resident ones now, streamed ones when bound

    def _clear(self) -> None:
        self.recs: dict[tuple, Rec] = {}
        self.outs: dict[tuple, torch.Tensor] = {}
        self.grad_out: dict[tuple, torch.Tensor] = {}     # gradient of layer L's output, micro-batch mb
        self.pending_grads: dict[tuple, list] = {}
        self.loaded: dict[int, torch.Tensor] = {}          # load op id -> device buffer
        self.new_weights: dict[int, torch.Tensor] = {}
        self.mem: dict[int, tuple[int, int, int]] = {}     # op id -> (alloc, transient, free), measured
        self.deferred: dict[int, int] = {}                 # d2h op id -> bytes its source frees when waited for
        self.loss = torch.zeros((), dtype=torch.float32, device=self.target.device)
        self.saved_tensors = [0] * self.plan.n_layers      # tensors packed per layer this step (tests)
        self.loss_reduced = False                          # the step's loss goes with its first reduce

    # -- the executor's interface -------------------------------------------------------------------------------

    def execute(self, op, gpu) -> None:
        getattr(self, "_" + op.kind)(op, gpu)

    def book(self, op) -> None:
        """Book an op's measured device bytes, in issue order. A copy off the device (offload, grad) frees its
        source only once an op that waits for it is issued, or at the step's end: until then the copy may still be
        reading it (on CUDA the allocator keeps it, by record_stream). The schedule's replay counts the same way."""
        m, k, key = self.store.meter, op.kind, (op.layer, op.micro_batch)
        for d in op.deps:
            m.book("activations", free=self.deferred.pop(d, 0))
        if k == "load_weights":
            m.book("prefetch", alloc=self.store.weight_bytes(op.layer))
        elif k == "evict":
            m.book("prefetch", free=self.store.weight_bytes(op.layer))
        elif k == "offload_act":
            self.deferred[op.id] = self.recs[key].saved.nbytes
        elif k == "fetch_act":
            m.book("activations", alloc=self.recs[key].saved.nbytes)
        elif k == "grad_offload":
            self.deferred[op.id] = sum(g.nbytes for g in self.pending_grads[key] if g is not None)
        elif op.id in self.mem:
            alloc, transient, free = self.mem.pop(op.id)
            m.book("workspace" if k == "optimizer_step" else "activations", alloc=alloc, transient=transient,
                   free=free)

    def end_step(self) -> None:
        """Book the frees of copies nothing waited for: every copy is done once the step is."""
        for nbytes in self.deferred.values():
            self.store.meter.book("activations", free=nbytes)
        self.deferred.clear()

    def moved_bytes(self, op) -> int:
        k = op.kind
        if k in ("load_weights", "read_weights", "upload_weights", "write_weights"):
            return self.store.weight_bytes(op.layer)
        if k in ("offload_act", "fetch_act"):
            return self.recs[(op.layer, op.micro_batch)].saved.nbytes
        if k in ("read_state", "write_state", "load_state", "save_state"):
            return self.optim.state_bytes(op.layer)
        if k == "grad_offload":
            return self.layouts[op.layer].params * self.target.weight_dtype.itemsize
        if k in ("reduce_grads", "gather_weights") and self.reducer is not None:
            return self.reducer.sent.pop(op.id, 0)
        return 0

    def abort(self) -> None:
        if self.store.staging is not None:
            self.store.staging.abort()

    def close(self) -> None:
        """The phase is over: unpin its host copies of device-updated weights."""
        for buf in self.scratch.values():
            self.store.host.release(buf)
        self.scratch.clear()

    def _bind(self, op) -> None:
        """Point a streamed layer's parameters at the device copy its compute op uses (called by compute ops)."""
        i = op.layer
        if self.store.tiers[i] != Tier.GPU:
            self.bound[i] = self.loaded[self.load_of[op.id]]
            bind(self.layers[i], self.layouts[i], self.bound[i], empty=self.store.empty)
            if self.reducer is not None and i in self.reducer.flat:
                self.reducer.attach(i, self._params(i))

    def _evict(self, op, gpu) -> None:
        i = op.layer
        buf = self.loaded.pop(self.load_of[op.id])
        if gpu is not None:
            buf.record_stream(gpu)  # the compute stream used it: no reuse before that work is done
        if self.bound.get(i) is buf:
            bind(self.layers[i], self.layouts[i], None, empty=self.store.empty)
            del self.bound[i]
        self.store.buffers.give(buf)

    # -- weights ------------------------------------------------------------------------------------------------

    def _read_weights(self, op, gpu) -> None:
        self.staged[op.id] = self.store.read_weights(op.layer)

    def _load_weights(self, op, gpu) -> None:
        i, n = op.layer, self.layouts[op.layer].numel
        buf = self.store.buffers.take(n)
        read = next((d for d in op.deps if d in self.staged), None)
        src = self.store.pinned(i) if read is None else self.staged.pop(read)
        buf.copy_(src[:n], non_blocking=gpu is not None)
        if read is not None:
            event = None
            if gpu is not None:
                event = torch.cuda.Event()
                event.record(gpu)
            self.store.release_staging(src, event)
        self.loaded[op.id] = buf

    # -- gradients ---------------------------------------------------------------------------------------------

    def _grad_offload(self, op, gpu) -> None:
        grads = self.pending_grads.pop((op.layer, op.micro_batch))
        self.optim.offload_grads(op.layer, grads, first=op.micro_batch == 0)
        if gpu is not None:
            for g in grads:
                if g is not None:  # a tied head's copy of the matrix has none
                    g.record_stream(gpu)

    # -- the optimizer step -------------------------------------------------------------------------------------

    def _params(self, i: int) -> list:
        return list(self.layers[i].parameters())

    def _read_state(self, op, gpu) -> None:
        self.optim.read_state(op.layer)

    def _write_state(self, op, gpu) -> None:
        self.optim.write_state(op.layer)

    def _grads(self, i: int) -> list:
        """What layer i's optimizer steps with: its gradients, or with sharded state this rank's reduced shard."""
        if self.reducer is not None and self.reducer.shard:
            return [self.reducer.shard_grad(i)]
        return self.optim.grads(i, self._params(i))

    def _optimizer_step(self, op, gpu) -> None:
        i = op.layer
        block = self.plan.blocks[self.phase.block]
        if self.reducer is not None:
            self.reducer.wait_all()  # the schedule's deps: every reduce of the block is complete (clip needs all)
        self.optim.clip(lambda: [self._grads(j) for j in block.layers])
        new, transient = self.optim.step_layer(i, self._grads(i), self.lr)
        for p in self._params(i):
            p.grad = None
        if op.stream == "compute":
            self.mem[op.id] = (0, transient, 0)
        if self.reducer is not None and self.reducer.shard:
            self.new_shards[i] = new  # its gather op brings every rank the whole layer
            return
        self._apply_new(i, new)

    def _apply_new(self, i: int, new: torch.Tensor) -> None:
        """The layer's updated weights to its tier: in place where they live next to the state, else held for
        the upload / writeback ops."""
        w, m = self.store.tiers[i], self.plan.placement(i).master
        if w == Tier.GPU and m == Tier.GPU:
            self.store.resident(i).copy_(new)
        elif w == Tier.CPU and m != Tier.GPU:
            self.store.pinned(i).copy_(new)
        else:
            self.new_weights[i] = new  # upload / writeback ops move it

    # -- data parallel (runtime.reducer) ------------------------------------------------------------------------

    def _reduce_grads(self, op, gpu) -> None:
        i = op.layer
        if self.optim.grad_tiers[i] == Tier.CPU:
            flat = self.optim.host_grads[i]
        else:
            flat = self.reducer.device_grads(i, self._params(i))
        loss = None if self.loss_reduced else self.loss
        self.loss_reduced = True
        self.reducer.reduce(op.id, i, flat, loss)
        self.reducer.finish(i)

    def _gather_weights(self, op, gpu) -> None:
        i = op.layer
        full = self.reducer.gather(op.id, i, self.new_shards.pop(i))
        self._apply_new(i, full[:self.layouts[i].numel])

    def _upload_weights(self, op, gpu) -> None:
        # popped: the host copy goes as soon as it is copied (a pageable source is read before copy_ returns)
        self.store.resident(op.layer).copy_(self.new_weights.pop(op.layer), non_blocking=gpu is not None)

    def _write_weights(self, op, gpu) -> None:
        i = op.layer
        on_device = self.plan.placement(i).master == Tier.GPU
        if op.stream == "nvme_write":
            self.store.write_weights(i, self.scratch[i] if on_device else self.new_weights.pop(i))
            return
        new = self.new_weights.pop(i)
        if gpu is not None:
            new.record_stream(gpu)  # made on the compute stream, read here
        if self.store.tiers[i] == Tier.CPU:  # d2h writeback after a step on the device
            self.store.pinned(i).copy_(new, non_blocking=gpu is not None)
            return
        if i not in self.scratch:
            self.scratch[i] = self.store.host.empty(self.layouts[i].numel, self.target.weight_dtype)
        self.scratch[i].copy_(new)  # synchronous: the NVMe write after it reads the host copy

    # -- phase switches -----------------------------------------------------------------------------------------

    def _load_state(self, op, gpu) -> None:
        self.optim.load_kept(op.layer)
        buf = self.optim.states[op.layer].buf
        if gpu is not None and buf is not None and buf.is_cuda:
            buf.record_stream(self.streams.gpu("compute"))  # made on the h2d stream, stepped on compute

    def _save_state(self, op, gpu) -> None:
        self.optim.save_kept(op.layer)


def _load_ids(ops) -> dict[int, int]:
    """For each compute and evict op of a streamed layer, the load op whose device copy it uses: a load among
    its own dependencies, else its recompute's (a backward after a recompute), else its compute's (an evict)."""
    by_id = {op.id: op for op in ops}
    out: dict[int, int] = {}
    for op in ops:
        if op.kind not in ("forward", "recompute", "backward", "evict"):
            continue
        deps = [by_id[d] for d in op.deps if by_id[d].layer == op.layer]
        found = next((d.id for d in deps if d.kind == "load_weights"), None)
        if found is None:
            via = "compute" if op.kind == "evict" else "recompute"
            found = next((out[d.id] for d in deps if d.id in out and (d.kind == "recompute" or via == "compute")
                          and d.micro_batch == op.micro_batch), None)
        if found is not None:
            out[op.id] = found
    return out
