"""POSIX shared memory for a Session beside its server (docs/shared_memory.md).

A session opened with ``shared_memory=True`` writes every request tensor into
a shared-memory object it owns (``/dev/shm/natgrad-...``, made with
multiprocessing.shared_memory) and sends only the span (region, offset,
length); it also names a reply buffer, where the server writes the step's
update tensors. The server must run on the same host (or in the same pod with
a memory-backed /dev/shm shared between the containers) with
``--shared_memory``.

Layout: two *slots*, chosen by the parity of the step number, so the step
being built never writes over the spans of the step still in flight (a
pipelined or streamed client builds step t+1 while step t waits for its
response; step t+2 is built only after step t's response came). Each slot
has request regions and one reply region. A slot is reset (its space reused
from offset 0) when the first tensor of a step numbered differently from the
slot's last one is written, or of the same number after that step was sent
complete or failed (a rebuild). A step that does not fit gets a new, larger
region (the spans already written stay where they are); at the slot's next
reset the smaller regions are unlinked, so a step of the same size then fits
in one region.

Nothing returned to the caller points into a region: StepResult arrays are
copies (read_array), and the replay buffer keeps a copy of each kept step's
span bytes (copy_spans, in a CopyPool's buffers), since the regions are
rewritten two steps later; a replay inlines from that copy.
"""
import mmap
import os
import secrets
import threading
import weakref
from multiprocessing import shared_memory as _mp_shm

import numpy as np

from natgrad import errors

PREFIX = "natgrad-"
ALIGN = 64  # the server's reply alignment; requests use it too (aligned copies)
MIN_REGION_BYTES = 1 << 20
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def align_up(n, a=ALIGN):
    return (n + a - 1) // a * a


def valid_region_name(name):
    """What the server accepts: "natgrad-" then 1..200 of [A-Za-z0-9._-]."""
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else None
    return bool(rest) and len(rest) <= 200 and set(rest) <= _NAME_CHARS


_counter = 0
_counter_lock = threading.Lock()


def _new_name():
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{n}"


class Region:
    """One shared-memory object this process created (and unlinks)."""

    __slots__ = ("shm", "name", "size", "pid")

    def __init__(self, size):
        name = _new_name()
        try:
            shm = _mp_shm.SharedMemory(name=name, create=True, size=size)
        except OSError as e:
            raise errors.ResourceExhausted(
                f"natgrad shared memory: cannot create /dev/shm/{name} of {size} bytes: {e}") from None
        # Reserve the pages now: on a full tmpfs (a container's 64 MiB
        # default /dev/shm) a write into an unbacked page is SIGBUS, which
        # would kill the process; posix_fallocate fails cleanly instead.
        fd = getattr(shm, "_fd", -1)
        if fd >= 0 and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                _unlink(shm)
                free = _shm_free()
                raise errors.ResourceExhausted(
                    f"natgrad shared memory: /dev/shm has no room for a {size}-byte region "
                    f"({e.strerror}; {free} bytes free): give the container a larger /dev/shm "
                    "(docker --shm-size, a Kubernetes emptyDir with medium: Memory) or turn "
                    "shared_memory off") from None
        self.shm, self.name, self.size, self.pid = shm, name, size, os.getpid()

    def view(self, dtype, shape, offset):
        return np.ndarray(shape, dtype=dtype, buffer=self.shm.buf, offset=offset)

    def close(self):
        if self.shm is not None and self.pid == os.getpid():  # (not in a forked child)
            _unlink(self.shm)
        self.shm = None


def _shm_free():
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return "unknown"


def _unlink(shm):
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    try:
        shm.close()
    except BufferError:  # a view still alive somewhere: the mapping goes with it
        pass


def _close_all(regions):
    for r in list(regions.values()):
        r.close()
    regions.clear()


class _Slot:
    __slots__ = ("step", "done", "regions", "offset", "used", "reply", "reply_need")

    def __init__(self):
        self.step = None      # the step whose tensors the slot holds
        self.done = False     # that step was sent complete or failed: reset on the next write
        self.regions = []     # request regions of the step, the newest (largest) last
        self.offset = 0       # next free byte in regions[-1]
        self.used = 0         # bytes the step has written (with alignment), all regions
        self.reply = None     # reply region
        self.reply_need = 0   # the most reply bytes a step of this session needed


class Arena:
    """A session's regions: two slots by step parity (module docstring).

    initial_bytes: the size of a slot's first request region (default: sized
    by the first step, with a quarter more room). Thread-safe: natgrad.torch
    builds blocks on a builder thread while its sender reads the previous
    step's reply."""

    def __init__(self, initial_bytes=0):
        self.initial_bytes = int(initial_bytes or 0)
        self._slots = (_Slot(), _Slot())
        self._regions = {}  # name -> Region, every live region (spans are looked up here)
        self._lock = threading.Lock()
        self._reply_hint = 0
        self._step_bytes = 0  # the most a step has written (regions are made at least this large)
        self.regions_created = 0  # (monitoring/tests: regrowth makes more)
        # At exit, or when the arena is garbage: unlink what is left.
        self._finalizer = weakref.finalize(self, _close_all, self._regions)

    # -- requests -------------------------------------------------------------
    def _region(self, size):
        r = Region(size)
        self._regions[r.name] = r
        self.regions_created += 1
        return r

    def _drop(self, r):
        if r is not None:
            self._regions.pop(r.name, None)
            r.close()

    def _slot_for(self, step):
        """The slot of `step`, reset if a new build of that step starts."""
        s = self._slots[step % 2]
        if s.step != step or s.done:
            s.step, s.done = step, False
            # The largest region stays if the largest step so far fits in it;
            # else a region for that size is made at the first write.
            self._step_bytes = max(self._step_bytes, s.used)
            for r in s.regions[:-1]:
                self._drop(r)
            s.regions = s.regions[-1:]
            if s.regions and s.regions[0].size < self._step_bytes:
                self._drop(s.regions.pop())
            s.offset = s.used = 0
        return s

    def write(self, step, array, dtype, span):
        """Copies `array` (converted to `dtype` in the same pass) into step
        `step`'s slot and fills the SharedMemorySpan message `span`."""
        n = int(array.size) * dtype.itemsize
        with self._lock:
            s = self._slot_for(step)
            r = s.regions[-1] if s.regions else None
            off = align_up(s.offset)
            if r is None or off + n > r.size:
                # Room for twice what the step has needed so far: the rest
                # of this step likely fits, and the next such step fits
                # whole.
                need = s.used + n
                if r is None:
                    need = max(need, self._step_bytes)
                size = max(self.initial_bytes if r is None else 0, 2 * r.size if r else 0,
                           align_up(2 * need if r else need + need // 4, MIN_REGION_BYTES))
                r = self._region(size)
                s.regions.append(r)
                off = 0
            s.used += (off - s.offset if off >= s.offset else 0) + n
            s.offset = off + n
            view = r.view(dtype, array.shape, off)
        # Outside the lock: the copy is the work (the span is reserved).
        np.copyto(view, array, casting="unsafe")
        del view
        span.region, span.offset, span.length = r.name, off, n

    def finish(self, step):
        """Step `step` was sent complete, or failed: a later write for the same
        number is a rebuild and starts the slot afresh."""
        with self._lock:
            s = self._slots[step % 2]
            if s.step == step:
                s.done = True

    # -- replies --------------------------------------------------------------
    def reply_span(self, step, need, span):
        """Fills `span` with step `step`'s reply buffer of at least `need` bytes."""
        need = max(int(need), self._reply_hint)
        if need <= 0:
            return False
        with self._lock:
            s = self._slots[step % 2]
            if s.reply is None or s.reply.size < need:
                self._drop(s.reply)
                s.reply = None
                s.reply = self._region(max(align_up(need + need // 4, MIN_REGION_BYTES),
                                           MIN_REGION_BYTES))
            span.region, span.offset, span.length = s.reply.name, 0, s.reply.size
        return True

    def note_reply_need(self, need):
        """A reply needed `need` bytes (some tensors came inline when less was
        given): later reply buffers are at least that large."""
        self._reply_hint = max(self._reply_hint, int(need))

    # -- reading ----------------------------------------------------------------
    def _find(self, span, what):
        r = self._regions.get(span.region)
        if r is None or r.shm is None:
            raise errors.Internal(f"{what}: the server named shared memory region "
                                  f"'{span.region}', not one of this session's")
        if span.offset < 0 or span.length < 0 or span.offset + span.length > r.size:
            raise errors.Internal(f"{what}: span [{span.offset}, +{span.length}) is outside region "
                                  f"'{span.region}' of {r.size} bytes")
        return r

    def read_array(self, span, dtype, shape, what="tensor"):
        """A native-order copy of the span's values (never a view)."""
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if span.length != n * dtype.itemsize:
            raise errors.Internal(f"{what}: shared memory span of {span.length} bytes, shape "
                                  f"{list(shape)} of {dtype} needs {n * dtype.itemsize}")
        with self._lock:
            r = self._find(span, what)
            a = np.frombuffer(r.shm.buf, dtype=dtype, count=n, offset=span.offset).reshape(shape)
            out = a.astype(dtype.newbyteorder("="), copy=True)
            del a
        return out

    def read_bytes(self, span, what="tensor"):
        with self._lock:
            r = self._find(span, what)
            return bytes(r.shm.buf[span.offset:span.offset + span.length])

    def copy_spans(self, msgs, pool, what="message"):
        """SpanCopies of every shared-memory span in `msgs`, each copied into
        a buffer from `pool`: what a step kept for replay holds once the
        regions are reused."""
        copies = {}
        for m in msgs:
            for t in tensors(m):
                if not t.HasField("shared_memory"):
                    continue
                sp = t.shared_memory
                key = (sp.region, sp.offset, sp.length)
                if key in copies:
                    continue
                buf = pool.take(sp.length)
                with self._lock:
                    r = self._find(sp, what)
                    memoryview(buf)[:] = r.shm.buf[sp.offset:sp.offset + sp.length]
                copies[key] = buf
        return SpanCopies(copies)

    # -- lifecycle ------------------------------------------------------------
    @property
    def region_names(self):
        return sorted(self._regions)

    @property
    def mapped_bytes(self):
        return sum(r.size for r in self._regions.values())

    def close(self):
        """Unlinks every region; the arena may be used again (new regions)."""
        with self._lock:
            _close_all(self._regions)
            self._step_bytes = max([self._step_bytes] + [s.used for s in self._slots])
            self._slots = (_Slot(), _Slot())


class SpanCopies:
    """The bytes of some messages' shared-memory spans, copied out of the
    regions (Arena.copy_spans). Reads like an Arena, so inline_spans and
    materialize take either."""

    def __init__(self, copies):
        self._copies = copies  # (region, offset, length) -> a CopyPool buffer

    @property
    def nbytes(self):
        return sum(len(b) for b in self._copies.values())

    def read_bytes(self, span, what="tensor"):
        b = self._copies.get((span.region, span.offset, span.length))
        if b is None:
            raise errors.Internal(f"{what}: no copy of shared memory span '{span.region}' "
                                  f"[{span.offset}, +{span.length}) was kept")
        return bytes(b)

    def release(self, pool):
        """Gives the buffers back to `pool`; the copies are gone."""
        for b in self._copies.values():
            pool.give(b)
        self._copies = {}


class CopyPool:
    """Buffers for SpanCopies, recycled by size. Keeping a shared-memory step
    for replay copies its tensors out of the regions (they are reused two
    steps later); a fresh 46 MB bytes object per step page-faults all of it
    in again, and assigning it to a proto copies it once more, about 45 ms a
    step for natgrad.torch's autoencoder here. A recycled buffer makes that
    one memcpy. The pool never holds more than the kept copies' high-water
    mark less what they hold now, so copies and pool together stay within
    the most the replay buffer has held."""

    def __init__(self):
        self._free = {}       # length -> [buffer]
        self._free_bytes = 0
        self._out = 0         # bytes in SpanCopies not yet released
        self._peak = 0        # high-water mark of _out

    @property
    def free_bytes(self):
        return self._free_bytes

    def take(self, n):
        bufs = self._free.get(n)
        if bufs:
            b = bufs.pop()
            self._free_bytes -= n
        else:
            # Anonymous memory: the kernel's zero pages fault in under the
            # copy, one pass (bytearray(n) zero-fills first; numpy asks for
            # huge pages, slow to find beside a large replay buffer).
            b = mmap.mmap(-1, n) if n else bytearray()
        self._out += n
        self._peak = max(self._peak, self._out)
        return b

    def give(self, b):
        n = len(b)
        self._out -= n
        if self._free_bytes + self._out + n <= self._peak:
            self._free.setdefault(n, []).append(b)
            self._free_bytes += n

    def clear(self):
        self._free.clear()
        self._free_bytes = 0
        self._peak = self._out


# -- messages -----------------------------------------------------------------
def tensors(msg):
    """Every natgrad.v1.Tensor inside `msg` (depth first)."""
    for fd, v in msg.ListFields():
        if fd.type != fd.TYPE_MESSAGE or fd.message_type.GetOptions().map_entry:
            continue
        rep = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        for m in (v if rep else (v,)):
            if fd.message_type.full_name == "natgrad.v1.Tensor":
                yield m
            else:
                yield from tensors(m)


def has_spans(msg):
    return any(t.HasField("shared_memory") for t in tensors(msg))


def inline_spans(msg, arena, what="message"):
    """Puts the bytes of every shared-memory tensor in `msg` inline (in
    place): read out of `arena`, the span cleared."""
    for t in tensors(msg):
        if t.HasField("shared_memory"):
            t.data = arena.read_bytes(t.shared_memory, what)
            t.ClearField("shared_memory")


def materialize(msg, arena, what="message"):
    """A copy of `msg` with every shared-memory tensor's bytes inline (and a
    request's reply_buffer cleared): what may be kept past the regions'
    reuse, and the form a kept answer is compared in."""
    out = type(msg)()
    out.CopyFrom(msg)
    if out.DESCRIPTOR.fields_by_name.get("reply_buffer") is not None:
        out.ClearField("reply_buffer")
    inline_spans(out, arena, what)
    return out
