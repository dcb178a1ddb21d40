"""Compile a recorded launch for sm_90 without a GPU and read its SASS (PERF.md, "Measuring on
the CPU", step 2).

``compile_launch`` compiles a :class:`bench.launch_recorder.Launch` exactly as triton would for
an H100 (its signature, constexprs, divisibility attrs and options). ``analyse_cubin`` reads the
cubin with the ``cuobjdump`` / ``nvdisasm`` shipped inside the triton package: registers, stack
and local memory (spills), shared memory, and the instruction mix of the whole kernel and of each
innermost loop. A loop is the address range [target, branch] of a backward ``BRA``; an innermost
loop contains no other loop; the *hot* loop is the innermost loop with the most MUFU
instructions (then the most instructions).

``dynamic_instructions`` weighs every instruction by how often its loop runs: the line info of
the cubin (``nvdisasm -gi``: each instruction's source call chain, inlined calls included) is
matched with the interpreter's count of the same source sites (``interp_counter``), so a loop
that a fallback branch holds but no input takes counts 0, not as the "hot" loop.

Must run WITHOUT ``TRITON_INTERPRET`` (interpreted functions are not compiled).
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile

HOPPER_SMS = 132

# opcode families counted in the instruction mix (base opcode = text before the first '.')
FP32_OPS = {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD",
            "FMNMX3", "FADD2", "FFMA2", "FMUL2"}
CATEGORIES = ("total", "MUFU", "EX2LG2", "LDG_WORDS", "FP32", "SHFL", "BAR", "LDG", "STG", "LDS", "STS", "LDL", "STL",
              "ATOM", "BRA")


def tool(name: str) -> str | None:
    """Path of a CUDA binary utility shipped with triton (or on PATH), None if absent."""
    try:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except Exception:  # pragma: no cover
        pass
    import shutil
    return shutil.which(name)


_COMPILED: dict = {}


def compile_launch(launch):
    """The sm_90 CompiledKernel of a recorded launch (cached per specialisation)."""
    key = launch.key()
    if key not in _COMPILED:
        import triton
        from triton.backends.compiler import GPUTarget
        src = triton.compiler.ASTSource(fn=launch.fn, signature=launch.signature,
                                        constexprs=launch.constexprs, attrs=launch.attrs)
        _COMPILED[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                        options=launch.options.__dict__)
    return _COMPILED[key]


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    opcode: str
    operands: str
    chain: str = ""      # source call chain (interp_counter.site_key form), with line info

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_SOURCE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')


def source_name(path: str) -> str:
    """A source file as the chains name it: from ``rotp_triton/`` on (else its base name), so
    that a cubin from triton's cache, compiled from another checkout of the same sources,
    still matches."""
    path = path.replace(os.sep, "/")
    if "/rotp_triton/" in path:
        return "rotp_triton/" + path.rsplit("/rotp_triton/", 1)[1]
    return path.rsplit("/", 1)[-1]


def triton_dir() -> str:
    """triton's package directory (its own helpers are left out of the source chains)."""
    import triton
    return os.path.dirname(os.path.realpath(triton.__file__))


def disassemble(cubin: bytes, line_info: bool = False) -> tuple[list[Instr], dict]:
    """(instructions in address order, label -> address) of the cubin's first kernel; with
    ``line_info`` each instruction carries its source call chain (``Instr.chain``)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        flags = ["-c", "-gi"] if line_info else ["-c"]
        out = subprocess.run([tool("nvdisasm"), *flags, path], capture_output=True, text=True,
                             check=True).stdout
    instrs, labels, pending = [], {}, []
    block, chain = [], ""   # the comment lines of a location, innermost call first
    lib = triton_dir()
    for line in out.splitlines():
        m = _SOURCE.match(line)
        if m:
            f = os.path.realpath(m.group(1))
            if not f.startswith(lib):    # triton's own helpers (tl.sum's combine...): as
                block.append(f"{source_name(f)}:{m.group(2)}")  # the interpreter's, without
            continue
        if block:
            chain, block = "<".join(block), []
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append(Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4).strip(),
                                chain))
    for lab in pending:  # a label after the last instruction
        labels[lab] = instrs[-1].addr + 16 if instrs else 0
    return instrs, labels


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the kernel from ``cuobjdump --dump-resource-usage``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out.split("Function", 1)[-1])
        res[key.lower()] = int(m.group(1)) if m else None
    return res


def _words(i) -> int:
    """32-bit words a load or store moves per thread (LDG.E.128: 4, .64: 2, else 1)."""
    m = re.search(r"\.(64|128)\b", i.opcode)
    return int(m.group(1)) // 32 if m else 1


def mix(instrs) -> dict:
    """Instruction counts by category (NOP excluded)."""
    c = collections.Counter()
    for i in instrs:
        b = i.base
        if b == "NOP":
            continue
        c["total"] += 1
        if b == "MUFU":
            c["MUFU"] += 1
            if i.opcode.startswith(("MUFU.EX2", "MUFU.LG2")):
                c["EX2LG2"] += 1
        elif b in FP32_OPS:
            c["FP32"] += 1
        elif b in ("SHFL", "BAR", "LDG", "STG", "LDS", "STS", "LDL", "STL", "BRA"):
            c[b] += 1
            if b == "LDG":
                c["LDG_WORDS"] += _words(i)
        elif b in ("ATOM", "ATOMG", "RED", "REDG", "ATOMS"):
            c["ATOM"] += 1
    return {k: c.get(k, 0) for k in CATEGORIES}


def divergent_paths(instrs, labels) -> set[int]:
    """Addresses of the code a ``BRA.DIV`` jumps to: the warp-divergent fallback of a warp
    collective (a shuffle under a branch ptxas cannot prove warp-uniform, e.g. one on a value
    reduced across the block), from its target through the unconditional BRA that returns.
    ptxas lays it out at the kernel's end, so that its jump back spans unrelated code; a warp
    runs it only when diverged, which the kernels' block-uniform branches never are."""
    at = {i.addr: k for k, i in enumerate(instrs)}
    out = set()
    for i in instrs:
        m = _TARGET.search(i.operands) if i.opcode == "BRA.DIV" else None
        k = at.get(labels.get(m.group(1))) if m else None
        while k is not None and k < len(instrs):
            j = instrs[k]
            out.add(j.addr)
            if j.base in ("BRA", "EXIT", "RET") and not j.pred and j.opcode != "BRA.DIV":
                break
            k += 1
    return out


def loops(instrs, labels) -> list[tuple[int, int]]:
    """(start, end) address ranges of backward branches: target < branch address (not the
    jumps back from :func:`divergent_paths`)."""
    out = []
    fallback = divergent_paths(instrs, labels)
    for i in instrs:
        if i.base != "BRA" or i.addr in fallback:
            continue
        m = _TARGET.search(i.operands)
        # target < branch: a loop (target == branch is the `BRA self` that ends every kernel)
        if m and m.group(1) in labels and labels[m.group(1)] < i.addr:
            out.append((labels[m.group(1)], i.addr))
    return sorted(set(out))


def innermost(ranges) -> list[tuple[int, int]]:
    """The loops that contain no other loop."""
    return [r for r in ranges
            if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]


def analyse_cubin(cubin: bytes) -> dict:
    """Resource usage, whole-kernel mix, and the mix of every innermost loop and of the hot
    loop (``hot`` is None when the kernel has no loop)."""
    instrs, labels = disassemble(cubin)
    res = resource_usage(cubin)
    ranges = loops(instrs, labels)
    inner = []
    for a, b in innermost(ranges):
        body = [i for i in instrs if a <= i.addr <= b]
        inner.append(dict(start=a, end=b, mix=mix(body)))
    hot = max(inner, key=lambda L: (L["mix"]["MUFU"], L["mix"]["total"]), default=None)
    kernel_mix = mix(instrs)
    return dict(regs=res["reg"], stack_bytes=res["stack"], local_bytes=res["local"],
                shared_bytes_static=res["shared"], spill_ldl_stl=kernel_mix["LDL"] +
                kernel_mix["STL"], kernel_mix=kernel_mix, loops=len(ranges),
                innermost_loops=inner, hot=hot)


def _unroll(ins, sites, elems, threads) -> int:
    """How many source trips one trip of a loop body holds (ptxas unrolls small loops), read
    from the words its counted loads and stores move against what one execution of their
    statement gives a thread: only statements whose tile covers every thread (a blocked layout
    then gives each thread elements ÷ threads of it, none replicated across lanes; fp32
    assumed - a half-precision tile reads half). MUFU is no evidence: one statement may hold
    several transcendental ops, and ptxas's line info credits two calls' MUFU to one. 1
    without such a statement (an unrolled body beside its remainder loop or peeled trips is
    read by :func:`_trips_held` first)."""
    per = collections.Counter()
    for i in ins:
        if i.base in ("LDG", "STG") and i.chain in sites and elems.get(i.chain, 1) >= threads:
            per[(i.base, i.chain)] += _words(i)
    ratios = sorted(n / (elems[c] / threads) for (_, c), n in per.items())
    if not ratios:
        return 1
    return max(1, int(round(ratios[len(ratios) // 2])))


def _trips_held(bodies, sites) -> list:
    """How many source trips each of several copies of one loop's body holds (the loop, the
    other loops of its statements - a remainder loop, a copy -, and last the code around it
    where ptxas may have peeled trips: lists of instructions): their counts of one kind of
    counted instruction over the largest count that divides them all. The kind: MUFU.EX2/LG2
    where the loop has any, else stores, else loads (a load pipelined ahead of a loop is no copy
    of its body, nor a reciprocal of its trip count; an exp2 or a store is one). The code around
    holds no trip unless it has every counted statement of the loop."""
    def count(ins, kind):
        if kind == "MUFU":
            return sum(1 for i in ins if i.chain in sites
                       and i.opcode.startswith(("MUFU.EX2", "MUFU.LG2")))
        return sum(1 for i in ins if i.chain in sites and i.base == kind)

    def statements(ins):
        return {i.chain for i in ins if i.chain in sites and i.base in ("LDG", "STG", "MUFU")}
    kind = next((k for k in ("MUFU", "STG", "LDG") if count(bodies[0], k)), None)
    if kind is None:
        return [1] * (len(bodies) - 1) + [0]
    n = [count(b, kind) for b in bodies]
    if not statements(bodies[0]) <= statements(bodies[-1]):
        n[-1] = 0
    unit = functools.reduce(math.gcd, [c for c in n if c])
    return [c // unit for c in n]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def _source_tree(name: str):
    """The parsed source of a file as the chains name it (``source_name``: a path from the
    repository root, or a base name, looked for under it - the test probes'), or None."""
    path = os.path.join(ROOT, name)
    if not os.path.isfile(path):
        found = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "site-packages")
            if name in files:
                found.append(os.path.join(d, name))
        if not found:
            return None
        path = found[0]
    with open(path) as f:
        return ast.parse(f.read())


@functools.lru_cache(maxsize=None)
def _branch_bodies(name: str) -> tuple:
    """(first, last) source lines of every ``if`` / ``else`` body in a source file as the
    chains name it (() when it is not found under the repository)."""
    tree = _source_tree(name)
    if tree is None:
        return ()
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            for body in (node.body, node.orelse):
                if body:
                    spans.append((body[0].lineno, max(b.end_lineno for b in body)))
    return tuple(spans)


@functools.lru_cache(maxsize=None)
def _static_bodies(name: str) -> tuple:
    """(first, last) source lines of every ``for ... in tl.static_range(...)`` body in a source
    file as the chains name it (() when it is not found under the repository)."""
    tree = _source_tree(name)
    if tree is None:
        return ()
    return tuple((node.body[0].lineno, max(b.end_lineno for b in node.body))
                 for node in ast.walk(tree)
                 if isinstance(node, ast.For) and isinstance(node.iter, ast.Call)
                 and getattr(node.iter.func, "attr", getattr(node.iter.func, "id", None))
                 == "static_range")


@functools.lru_cache(maxsize=None)
def _loop_headers(name: str) -> frozenset:
    """The lines of every ``for`` / ``while`` header in a source file as the chains name it."""
    tree = _source_tree(name)
    if tree is None:
        return frozenset()
    return frozenset(node.lineno for node in ast.walk(tree)
                     if isinstance(node, (ast.For, ast.While)))


@functools.lru_cache(maxsize=None)
def _loop_bodies(name: str) -> dict:
    """header line -> (first, last) line of its body, for every ``for`` / ``while`` in a source
    file as the chains name it."""
    tree = _source_tree(name)
    if tree is None:
        return {}
    return {node.lineno: (node.body[0].lineno, max(b.end_lineno for b in node.body))
            for node in ast.walk(tree) if isinstance(node, (ast.For, ast.While))}


@functools.lru_cache(maxsize=None)
def _guarded_bodies(name: str) -> tuple:
    """(first, last) lines of every body that may run other than once each time the code
    around it runs: ``if`` / ``else`` bodies and loop bodies."""
    return _branch_bodies(name) + tuple(_loop_bodies(name).values())


def _frame(part: str) -> tuple:
    name, _, line = part.rpartition(":")
    return name, int(line) if line.isdigit() else -1


def _once_per_trip(chain: str, header: str) -> bool:
    """Whether a statement runs exactly once per trip of the loop whose header statement is
    ``header`` (a chain too): it lies in that loop's body, called from it through frames in
    the same context, and neither there nor in any helper on the way is it inside an ``if`` /
    ``else`` body or an inner loop's body."""
    head, _, ctx = header.partition("<")
    hname, hline = _frame(head)
    frames = chain.split("<")
    for j in range(len(frames)):
        if "<".join(frames[j + 1:]) != ctx:
            continue
        name, line = _frame(frames[j])
        first, last = _loop_bodies(name).get(hline, (0, -1)) if name == hname else (0, -1)
        if not first <= line <= last:
            return False
        if any(first <= a and b <= last and (a, b) != (first, last) and a <= line <= b
               for a, b in _guarded_bodies(name)):
            return False
        return not any(a <= ln <= b for f in frames[:j] for n, ln in [_frame(f)]
                       for a, b in _guarded_bodies(n))
    return False


def _loop_header(chain: str) -> bool:
    """Whether a statement is a loop's header: the interpreter counts its ops (the range) once
    per entry, while ptxas puts the trip's increment and test under its line in the body."""
    name, _, line = chain.split("<", 1)[0].rpartition(":")
    return line.isdigit() and int(line) in _loop_headers(name)


def _in_static_range(chain: str) -> bool:
    """Whether a statement, or a call on its chain, lies in a ``tl.static_range`` body: the
    compiler copies it once per index, so its count is a multiple of the loop trips around it."""
    for part in chain.split("<"):
        name, _, line = part.rpartition(":")
        if line.isdigit() and any(a <= int(line) <= b for a, b in _static_bodies(name)):
            return True
    return False


def _untaken_branch(chain: str, lines_by_context: dict) -> bool:
    """Whether an instruction's statement lies in an ``if`` / ``else`` body of which no
    statement ran in the same call context (a runtime branch the input never took: a fallback
    form inline in a loop). The innermost body that holds the line decides."""
    head, _, ctx = chain.partition("<")
    name, _, line = head.rpartition(":")
    if not line.isdigit():
        return False
    n = int(line)
    spans = [sp for sp in _branch_bodies(name) if sp[0] <= n <= sp[1]]
    if not spans:
        return False
    lo, hi = min(spans, key=lambda sp: sp[1] - sp[0])
    return not any(lo <= m <= hi for m in lines_by_context.get((name, ctx), ()))


class _SiteCounts:
    """How often an instruction of a given source call chain ran, from the interpreter's site
    counts (:func:`dynamic_instructions`)."""

    def __init__(self, sites: dict):
        self.sites = sites
        # the call contexts that ran: every executed site's chain and each outer part of it
        self.ran = set(sites)
        self.by_context = collections.defaultdict(set)   # (file, context) -> lines that ran
        self.most = {}                                    # context -> its most frequent site
        for c in sites:
            head, _, ctx = c.partition("<")
            name, _, line = head.rpartition(":")
            if line.isdigit():
                self.by_context[(name, ctx)].add(int(line))
            for k in range(1, c.count("<") + 1):
                outer = c.split("<", k)[-1]
                self.ran.add(outer)
                self.most[outer] = max(self.most.get(outer, 0.0), float(sites[c]))

    def runs(self, chain: str, loop_runs: float):
        """(runs, "matched" | "dead" | None) of an instruction of ``chain`` in a loop that ran
        ``loop_runs`` times: its site's count (at most the loop's); 0 inside a call that never
        ran or in a branch body none of whose statements ran; else the loop's, at most the most
        frequent site of the call it was inlined from."""
        if chain in self.sites:
            return min(float(self.sites[chain]), loop_runs), "matched"
        ctx = chain.split("<", 1)[1] if "<" in chain else None
        if ctx is not None and ctx not in self.ran:
            return 0.0, "dead"          # inside a call (a helper's inlined body) that never ran
        if chain and _untaken_branch(chain, self.by_context):
            return 0.0, "dead"          # in a branch body none of whose statements ran
        if ctx is not None:
            return min(loop_runs, self.most.get(ctx, float(self.sites.get(ctx, loop_runs)))), None
        return loop_runs, None


def dynamic_instructions(cubin: bytes, sites: dict, programs: int, site_elems=None,
                         threads: int = 0) -> dict:
    """Instructions one thread executes, summed over ``programs`` programs.

    An instruction whose source call chain is a site the interpreter counted (``sites``: that
    statement's executions over all programs, ``interp_counter``) runs that often, at most as
    often as its loop; an instruction without a site as often as its loop, at most as often as
    the most frequent site of the call it was inlined from (ptxas lays the tail of a helper, a
    reduction the interpreter does not count, into whatever loop's address range it likes: a
    per-iteration vector pass's max counted at an element loop's trips), or never where the
    call it was inlined from never ran (a fallback pass) or where it lies in an ``if`` /
    ``else`` body none of whose statements ran in that context (``_untaken_branch``: an inline
    fallback form), nor in a warp-divergent fallback (:func:`divergent_paths`). A loop runs as
    often as its statements that run once per trip of its source loop say (``_once_per_trip``:
    in its body, under no ``if`` / ``else`` and no inner loop, at any call depth), else as most
    of its own matched instructions say (their most common count: a pipelined copy of a load
    or a branch not taken inside it aside; not its header's, which the interpreter counts once
    per entry, nor a statement a ``tl.static_range`` inside it copies),
    less the trips ptxas peeled into the code around it (run once per entry), divided among the
    copies the compiler made of it and by the source trips one trip of an unrolled body holds:
    against its remainder loop and the peeled trips where ptxas made them (``_trips_held``; the
    remainder loop gets (factor - 1) / 2 trips per entry, an estimate), else from the words its
    tile loads and stores move (``_unroll``: the sites' tile sizes ``site_elems`` and the
    program's ``threads``). A loop without any site runs as often as the loop around it; code
    outside loops once per program. Returns the instructions, their MUFU.EX2/LG2 (to set
    against the interpreter's exp2/log2 count, replicated lanes aside), how many instructions
    matched a site or lay in calls or branches that never ran, the static count, and per loop
    its instructions, runs and executed instructions."""
    instrs, labels = disassemble(cubin, line_info=True)
    ranges = loops(instrs, labels)

    def inner(addr, among):
        c = [r for r in among if r[0] <= addr <= r[1]]
        return min(c, key=lambda r: r[1] - r[0]) if c else None

    own = collections.defaultdict(list)                 # loop -> its instructions (not nested)
    for i in instrs:
        own[inner(i.addr, ranges)].append(i)
    # loops of the same source statements: copies the compiler made of one loop (a tail
    # duplicated into both paths of a rarely taken branch share its runs) or an unrolled body
    # beside its remainder loop (the body once)
    def stmts(r):
        return frozenset(i.chain for i in own[r] if i.chain)

    same = collections.defaultdict(list)
    for r in ranges:
        same[stmts(r)].append(r)

    def unrolled(r, per_trip):
        # read from the once-per-trip statements where there are any: a vector pass inlined
        # in an outer loop's body, its trips unrolled there, is no copy of that body
        body = [i for i in own[r] if i.chain in per_trip] if per_trip else own[r]
        return (_unroll(body, sites, site_elems, threads)
                if site_elems is not None and threads else 1)

    runs = {None: float(programs)}
    for r in sorted(ranges, key=lambda r: r[1] - r[0], reverse=True):  # outer loops first
        outer = inner(r[0], [o for o in ranges if o != r and o[0] <= r[0] and r[1] <= o[1]])
        around = runs[outer]                                # entries into the loop
        # its statements, not a nested loop's (ptxas may peel a nested loop's first trips into
        # the body around it: those run as often as the nested loop, not as this one)
        nested = set().union(*(stmts(o) for o in ranges
                               if o != r and r[0] <= o[0] and o[1] <= r[1]))
        counted = [i.chain for i in own[r] if i.chain in sites and i.chain not in nested
                   and not _loop_header(i.chain)]
        # the statements that run once per trip of its source loop say how often it ran
        # (a loop body whose first trip takes a long branch holds more instructions that ran
        # once than ones that ran every trip); else the most common count: a statement copied
        # by a static_range inside the loop counts once per copy, so the loop's trips are read
        # from the others where there are any
        per_trip = max(([c for c in counted if _once_per_trip(c, h)] for h in
                        {i.chain for i in own[r] if i.chain and _loop_header(i.chain)}),
                       key=len, default=[])
        plain = [c for c in counted if not _in_static_range(c)]
        seen = collections.Counter(sites[c] for c in (per_trip or plain or counted))
        if not seen:
            runs[r] = around
            continue
        n = float(seen.most_common(1)[0][0])                # source trips, all programs
        group = same[stmts(r)]
        # the loop, the other loops of its statements (a remainder loop, a copy) and the trips
        # ptxas peeled into the code around it (straight-line copies of its body there, run once
        # per entry: counted there)
        others = [o for o in group if o != r]
        peeled = [i for i in own[outer] if i.chain in stmts(r)]
        held = _trips_held([own[r]] + [own[o] for o in others] + [peeled], sites)
        n = max(0.0, n - around * held[-1])
        held = dict(zip([r] + others, held[:-1]))
        u = max(held.values())
        if u == min(held.values()):                         # one loop, or plain copies
            runs[r] = n / len(group) / (held[r] if held[r] > 1 else unrolled(r, set(per_trip)))
            continue
        # unrolled by u beside its remainder loop: each entry leaves (u - 1) / 2 trips to the
        # remainder on average (the trip count per entry is not counted: an estimate)
        rest = [o for o in group if held[o] == 1]
        left = min(n, around * (u - 1) / 2) if rest else 0.0
        if held[r] == 1:
            runs[r] = left / len(rest)
        else:
            runs[r] = (n - left) / held[r] / (len(group) - len(rest))
    counts = _SiteCounts(sites)
    fallback = divergent_paths(instrs, labels)
    total = matched = dead = mufu = 0.0
    breakdown = []
    for r, ins in own.items():
        before = total
        for i in ins:
            n, kind = (0.0, "dead") if i.addr in fallback else counts.runs(i.chain, runs[r])
            matched += kind == "matched"
            dead += kind == "dead"
            total += n
            if i.opcode.startswith(("MUFU.EX2", "MUFU.LG2")):
                mufu += n
        breakdown.append(dict(loop=r and [hex(r[0]), hex(r[1])], static=len(ins),
                              runs=runs[r], instructions=total - before))
    return dict(instructions=total, mufu=mufu, matched=int(matched), dead=int(dead),
                static=len(instrs), loops=breakdown)


def analyse_launch(launch) -> dict:
    """``analyse_cubin`` of the compiled launch plus triton's shared-memory size (dynamic
    shared memory included) and the launch's warps and stages."""
    k = compile_launch(launch)
    out = analyse_cubin(k.asm["cubin"])
    out.update(shared_bytes=int(getattr(k.metadata, "shared", 0) or 0),
               num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out
