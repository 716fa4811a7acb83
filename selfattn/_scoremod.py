"""score_mod without a compiler: a Python ``score_mod(score, b, h, q_idx, kv_idx) -> score`` traced
once into a small expression program (FlexAttention's score_mod, issue 22 point 2).

    prog = trace(score_mod)                # the function called once, on symbolic stand-ins
    s2 = prog.evaluate(score, b, h, q, kv) # NumPy, any broadcasting shapes: what the kernel will do
    d = prog.grad_score()                  # d score_mod / d score: another Program, same inputs
    g = prog.grad_arrays()                 # per captured array: (its index nodes, d / d value)

Tracing calls the function with stand-ins (``Sym``) for its five arguments. Arithmetic (+ - * / //
% ** and unary -, abs), comparisons, ``& | ~``, Python scalars, ``.astype``, and NumPy's ``exp log
tanh sqrt floor abs minimum maximum where clip`` (ufuncs and np.where through NumPy's dispatch protocols) record
one node each; NumPy arrays the function captures (closure variables, globals, default arguments)
are replaced by proxies for the call, so that ``bias[h, q_idx - kv_idx + 127]`` records a load at
index expressions. Anything else -- Python ``if`` / ``and`` / ``or`` on a traced value, a call the
tracer does not know, an array reached another way -- is a ``ScoreModTraceError`` that names the
operation.

The program is a list of nodes in evaluation order (SSA): the kernels will run it on a vector of
scores at a time (their index vectors beside); here ``evaluate`` runs it in NumPy for the float64
reference and the tests. Integer arithmetic follows Python / NumPy (floor division and modulo
rounding toward -inf); an index outside its array (after one wrap of a negative index, as NumPy
does) is an error, never a read elsewhere.

Not yet wired into ``flex_attention``'s kernel: this module is the front end (tracing, derivative,
NumPy evaluation) the C interpreter will take.
"""

import builtins
import types
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["trace", "lower", "Program", "Lowered", "ScoreModTraceError"]

# node kinds: the value's type
FLOAT, INT, BOOL = "f", "i", "b"
INPUTS = ("score", "b", "h", "q_idx", "kv_idx")

_BINARY = {"add", "sub", "mul", "div", "floordiv", "mod", "pow", "min", "max"}
_UNARY = {"neg", "abs", "exp", "log", "tanh", "sqrt", "floor", "toint", "cast"}
_COMPARE = {"lt", "le", "gt", "ge", "eq", "ne"}
_LOGIC = {"and", "or", "xor"}


class ScoreModTraceError(TypeError):
    """score_mod does something the tracer cannot record (the message names it)."""


class Program:
    """A traced score_mod: ``nodes[i] = (op, args, kind)``; args are node indices, except for
    ``in`` (the input's position), ``const`` (the value) and ``load`` (array index, then nodes)."""

    def __init__(self, nodes: List[Tuple[str, tuple, str]], out: int, arrays: List[np.ndarray]) -> None:
        self.nodes = nodes
        self.out = out
        self.arrays = arrays
        self.sources: List[Any] = list(arrays)     # trace: the captured objects (torch tensors kept)

    def __repr__(self) -> str:
        lines = []
        for i, (op, args, kind) in enumerate(self.nodes):
            if op == "in":
                a = INPUTS[args[0]]
            elif op == "const":
                a = repr(args[0])
            elif op == "load":
                a = f"array{args[0]}[" + ", ".join(f"%{j}" for j in args[1:]) + "]"
            else:
                a = ", ".join(f"%{j}" for j in args)
            lines.append(f"  %{i} = {op} {a} : {kind}")
        return "Program(\n" + "\n".join(lines) + f"\n  -> %{self.out})"

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any,
                 arrays: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """The program on NumPy values (broadcasting), float64 for the float nodes."""
        vals = self._values((score, b, h, q_idx, kv_idx), arrays)
        return np.asarray(vals[self.out])

    def _values(self, inputs: Sequence[Any], arrays: Optional[Sequence[np.ndarray]] = None) -> List[Any]:
        arrays = self.arrays if arrays is None else arrays
        v: List[Any] = []
        for op, args, kind in self.nodes:
            if op == "in":
                x = np.asarray(inputs[args[0]])
                x = x.astype(np.float64) if kind == FLOAT else x.astype(np.int64)
            elif op == "const":
                x = args[0]
            elif op == "load":
                arr = arrays[args[0]]
                idx = []
                for d, j in enumerate(args[1:]):
                    i = np.asarray(v[j], dtype=np.int64)
                    n = arr.shape[d]
                    i = np.where(i < 0, i + n, i)
                    if i.size and (i.min() < 0 or i.max() >= n):
                        raise IndexError(f"score_mod reads array{args[0]} (shape {arr.shape}) out of range "
                                         f"on axis {d}: index {int(i.min() if i.min() < 0 else i.max())}")
                    idx.append(i)
                x = arr[tuple(idx)]
                x = x.astype(np.float64) if kind == FLOAT else x
            else:
                a = [v[j] for j in args]
                x = _apply(op, a, kind)
            v.append(x)
        return v

    # -- derivatives --------------------------------------------------------------------------
    def _forward_mode(self, seed: Callable[[int, Tuple[str, tuple, str]], Optional[str]]) -> "Program":
        """The derivative of out by forward mode: a new program holding this one's nodes, then the
        tangents; seed(i, node) gives the seeded nodes' tangent ("one") or None."""
        nodes = list(self.nodes)

        def add(op: str, args: tuple, kind: str = FLOAT) -> int:
            nodes.append((op, args, kind))
            return len(nodes) - 1

        one = add("const", (1.0,))
        zero = add("const", (0.0,))
        t: List[Optional[int]] = []
        for i, (op, args, kind) in enumerate(self.nodes):
            if seed(i, (op, args, kind)) is not None:
                t.append(one)
                continue
            if kind != FLOAT or op in ("in", "const", "load") or op in _COMPARE or op in _LOGIC:
                t.append(None)
                continue
            ta = [t[j] for j in args]
            if all(x is None for x in ta):
                t.append(None)
                continue
            da = [zero if x is None else x for x in ta]
            a = args
            if op == "add":
                r = add("add", (da[0], da[1]))
            elif op == "sub":
                r = add("sub", (da[0], da[1]))
            elif op == "mul":
                r = add("add", (add("mul", (da[0], a[1])), add("mul", (a[0], da[1]))))
            elif op == "div":                          # (da - out * db) / b
                r = add("div", (add("sub", (da[0], add("mul", (i, da[1])))), a[1]))
            elif op == "neg":
                r = add("neg", (da[0],))
            elif op == "abs":                          # sign(a) da (1 at 0)
                r = add("where", (add("lt", (a[0], zero), BOOL), add("neg", (da[0],)), da[0]))
            elif op == "exp":
                r = add("mul", (i, da[0]))
            elif op == "log":
                r = add("div", (da[0], a[0]))
            elif op == "tanh":                         # (1 - tanh^2) da
                r = add("mul", (add("sub", (one, add("mul", (i, i)))), da[0]))
            elif op == "sqrt":                         # da / (2 sqrt a)
                r = add("div", (da[0], add("mul", (add("const", (2.0,)), i))))
            elif op in ("min", "max"):
                cmp = add("le" if op == "min" else "ge", (a[0], a[1]), BOOL)
                r = add("where", (cmp, da[0], da[1]))
            elif op == "where":
                r = add("where", (a[0], da[1], da[2]))
            elif op == "pow" and ta[1] is None:        # b a^(b-1) a' (a < 0 allowed)
                r = add("mul", (add("mul", (a[1], add("pow", (a[0], add("sub", (a[1], one)))))), da[0]))
            elif op == "pow":                          # a^b (b' log a + b a' / a)
                r = add("mul", (i, add("add", (add("mul", (da[1], add("log", (a[0],)))),
                                               add("div", (add("mul", (a[1], da[0])), a[0]))))))
            elif op in ("floordiv", "floor"):
                r = zero
            elif op == "mod":                          # a - floor(a / b) b
                r = add("sub", (da[0], add("mul", (add("floordiv", (a[0], a[1])), da[1]))))
            elif op == "cast":
                r = da[0]
            else:                                      # pragma: no cover (every float op above)
                raise ScoreModTraceError(f"no derivative for {op}")
            t.append(r)
        out = t[self.out]
        return Program(nodes, zero if out is None else out, self.arrays)

    def grad_score(self) -> "Program":
        """d score_mod / d score, as a program over the same inputs."""
        return self._forward_mode(lambda i, n: "one" if n[0] == "in" and n[1][0] == 0 else None)

    def loads(self) -> List[int]:
        """The nodes that read captured float arrays."""
        return [i for i, (op, args, kind) in enumerate(self.nodes) if op == "load" and kind == FLOAT]

    def grad_load(self, node: int) -> "Program":
        """d score_mod / d (the value node `node` loaded), as a program over the same inputs: a
        backward adds dS times it to the array at that load's index (the bias table's gradient)."""
        return self._forward_mode(lambda i, n: "one" if i == node else None)

    def depends_on(self, name: str) -> bool:
        """Whether the output depends on an input ("score", "b", "h", "q_idx", "kv_idx")."""
        k = INPUTS.index(name)
        dep = [False] * len(self.nodes)
        for i, (op, args, kind) in enumerate(self.nodes):
            if op == "in":
                dep[i] = args[0] == k
            elif op == "const":
                dep[i] = False
            elif op == "load":
                dep[i] = any(dep[j] for j in args[1:])
            else:
                dep[i] = any(dep[j] for j in args)
        return dep[self.out]


def _apply(op: str, a: List[Any], kind: str) -> Any:
    with np.errstate(all="ignore"):
        if op == "add":
            return np.add(a[0], a[1])
        if op == "sub":
            return np.subtract(a[0], a[1])
        if op == "mul":
            return np.multiply(a[0], a[1])
        if op == "div":
            return np.true_divide(a[0], a[1])
        if op == "floordiv":
            return np.floor_divide(a[0], a[1])
        if op == "mod":
            return np.mod(a[0], a[1])
        if op == "pow":
            return np.power(np.asarray(a[0], dtype=np.float64) if kind == FLOAT else a[0], a[1])
        if op == "min":
            return np.minimum(a[0], a[1])
        if op == "max":
            return np.maximum(a[0], a[1])
        if op == "neg":
            return np.negative(a[0])
        if op == "abs":
            return np.abs(a[0])
        if op == "exp":
            return np.exp(np.asarray(a[0], dtype=np.float64))
        if op == "log":
            return np.log(np.asarray(a[0], dtype=np.float64))
        if op == "tanh":
            return np.tanh(np.asarray(a[0], dtype=np.float64))
        if op == "sqrt":
            return np.sqrt(np.asarray(a[0], dtype=np.float64))
        if op == "cast":
            return np.asarray(a[0], dtype=np.float64)
        if op == "toint":
            return np.trunc(a[0]).astype(np.int64)
        if op == "floor":
            return np.floor(np.asarray(a[0], dtype=np.float64))
        if op in _COMPARE:
            return {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
                    "eq": np.equal, "ne": np.not_equal}[op](a[0], a[1])
        if op == "and":
            return np.logical_and(a[0], a[1])
        if op == "or":
            return np.logical_or(a[0], a[1])
        if op == "xor":
            return np.logical_xor(a[0], a[1])
        if op == "not":
            return np.logical_not(a[0])
        if op == "where":
            return np.where(a[0], a[1], a[2])
    raise ScoreModTraceError(f"unknown operation {op}")   # pragma: no cover


# ---------------------------------------------------------------------------------------------
class _Tracer:
    def __init__(self) -> None:
        self.nodes: List[Tuple[str, tuple, str]] = []
        self.consts: Dict[Tuple[str, Any], int] = {}
        self.arrays: List[np.ndarray] = []
        self.sources: List[Any] = []               # what each array came from (a torch tensor, or itself)

    def node(self, op: str, args: tuple, kind: str) -> "Sym":
        self.nodes.append((op, args, kind))
        return Sym(self, len(self.nodes) - 1, kind)

    def lift(self, x: Any, what: str) -> "Sym":
        if isinstance(x, Sym):
            if x.t is not self:
                raise ScoreModTraceError("a traced value from another score_mod call")
            return x
        if isinstance(x, (bool, np.bool_)):
            key: Tuple[str, Any] = (BOOL, bool(x))
        elif isinstance(x, (int, np.integer)):
            key = (INT, int(x))
        elif isinstance(x, (float, np.floating)):
            key = (FLOAT, float(x))
        elif (isinstance(x, np.ndarray) or _is_torch_tensor(x)) and x.ndim == 0:
            return self.lift(x.item(), what)               # a constant (a 0-d tensor gets no gradient)
        else:
            raise ScoreModTraceError(f"score_mod uses {type(x).__name__} {x!r:.60} in {what}: only Python or NumPy "
                                     f"scalars, the traced arguments and indexed captured arrays can be traced")
        if key not in self.consts:
            self.nodes.append(("const", (key[1],), key[0]))
            self.consts[key] = len(self.nodes) - 1
        return Sym(self, self.consts[key], key[0])


def _result_kind(op: str, ka: str, kb: str) -> str:
    if op == "div" or op in ("exp", "log", "tanh", "sqrt"):
        return FLOAT
    if FLOAT in (ka, kb):
        return FLOAT
    return INT


_UFUNCS = {np.add: "add", np.subtract: "sub", np.multiply: "mul", np.true_divide: "div",
           np.floor_divide: "floordiv", np.remainder: "mod", np.power: "pow", np.minimum: "min",
           np.maximum: "max", np.fmin: "min", np.fmax: "max", np.negative: "neg", np.absolute: "abs",
           np.exp: "exp", np.log: "log", np.tanh: "tanh", np.sqrt: "sqrt", np.floor: "floor", np.less: "lt",
           np.less_equal: "le", np.greater: "gt", np.greater_equal: "ge", np.equal: "eq",
           np.not_equal: "ne", np.logical_and: "and", np.logical_or: "or", np.logical_xor: "xor",
           np.logical_not: "not", np.bitwise_and: "and", np.bitwise_or: "or", np.bitwise_xor: "xor",
           np.invert: "not"}


class Sym:
    """A traced value (score_mod's stand-in for its arguments and what it computes from them)."""

    __array_priority__ = 1000

    def __init__(self, t: _Tracer, i: int, kind: str) -> None:
        self.t, self.i, self.kind = t, i, kind

    def _bin(self, op: str, other: Any, swap: bool = False) -> "Sym":
        o = self.t.lift(other, f"'{op}'")
        a, b = (o, self) if swap else (self, o)
        if op in _COMPARE:
            return self.t.node(op, (a.i, b.i), BOOL)
        if op in _LOGIC:
            if a.kind != BOOL or b.kind != BOOL:
                raise ScoreModTraceError(f"'{op}' (& | ^) on non-bool traced values: compare first, e.g. "
                                         f"(q_idx >= kv_idx) & (kv_idx < 5)")
            return self.t.node(op, (a.i, b.i), BOOL)
        return self.t.node(op, (a.i, b.i), _result_kind(op, a.kind, b.kind))

    def _un(self, op: str) -> "Sym":
        if op == "not":
            if self.kind != BOOL:
                raise ScoreModTraceError("~ on a non-bool traced value (bitwise not of integers is not traced)")
            return self.t.node("not", (self.i,), BOOL)
        kind = FLOAT if op in ("exp", "log", "tanh", "sqrt", "floor") else (INT if self.kind == BOOL else self.kind)
        return self.t.node(op, (self.i,), kind)

    __add__ = lambda s, o: s._bin("add", o)                       # noqa: E731
    __radd__ = lambda s, o: s._bin("add", o, True)                # noqa: E731
    __sub__ = lambda s, o: s._bin("sub", o)                       # noqa: E731
    __rsub__ = lambda s, o: s._bin("sub", o, True)                # noqa: E731
    __mul__ = lambda s, o: s._bin("mul", o)                       # noqa: E731
    __rmul__ = lambda s, o: s._bin("mul", o, True)                # noqa: E731
    __truediv__ = lambda s, o: s._bin("div", o)                   # noqa: E731
    __rtruediv__ = lambda s, o: s._bin("div", o, True)            # noqa: E731
    __floordiv__ = lambda s, o: s._bin("floordiv", o)             # noqa: E731
    __rfloordiv__ = lambda s, o: s._bin("floordiv", o, True)      # noqa: E731
    __mod__ = lambda s, o: s._bin("mod", o)                       # noqa: E731
    __rmod__ = lambda s, o: s._bin("mod", o, True)                # noqa: E731
    __pow__ = lambda s, o: s._bin("pow", o)                       # noqa: E731
    __rpow__ = lambda s, o: s._bin("pow", o, True)                # noqa: E731
    __lt__ = lambda s, o: s._bin("lt", o)                         # noqa: E731
    __le__ = lambda s, o: s._bin("le", o)                         # noqa: E731
    __gt__ = lambda s, o: s._bin("gt", o)                         # noqa: E731
    __ge__ = lambda s, o: s._bin("ge", o)                         # noqa: E731

    def __eq__(self, o: Any) -> "Sym":           # type: ignore[override]
        return self._bin("eq", o)

    def __ne__(self, o: Any) -> "Sym":           # type: ignore[override]
        return self._bin("ne", o)

    __and__ = lambda s, o: s._bin("and", o)                       # noqa: E731
    __rand__ = lambda s, o: s._bin("and", o, True)                # noqa: E731
    __or__ = lambda s, o: s._bin("or", o)                         # noqa: E731
    __ror__ = lambda s, o: s._bin("or", o, True)                  # noqa: E731
    __xor__ = lambda s, o: s._bin("xor", o)                       # noqa: E731
    __rxor__ = lambda s, o: s._bin("xor", o, True)                # noqa: E731
    __neg__ = lambda s: s._un("neg")                              # noqa: E731
    __pos__ = lambda s: s                                         # noqa: E731
    __abs__ = lambda s: s._un("abs")                              # noqa: E731
    __invert__ = lambda s: s._un("not")                           # noqa: E731
    __hash__ = object.__hash__

    # Tensor-style methods (a score_mod written for torch): the same nodes as NumPy's functions
    def abs(self) -> "Sym":
        return self._un("abs")

    def exp(self) -> "Sym":
        return self._un("exp")

    def log(self) -> "Sym":
        return self._un("log")

    def tanh(self) -> "Sym":
        return self._un("tanh")

    def sqrt(self) -> "Sym":
        return self._un("sqrt")

    def floor(self) -> "Sym":
        return self._un("floor")

    def clamp(self, min: Any = None, max: Any = None) -> "Sym":     # noqa: A002 (torch's names)
        x = self if min is None else np.maximum(self, min)
        return x if max is None else np.minimum(x, max)

    clip = clamp

    def astype(self, dtype: Any) -> "Sym":
        """x.astype(int-like): toward zero, as NumPy's; x.astype(float-like): a float value."""
        k = np.dtype(dtype).kind
        if k in "iu":
            if self.kind == INT:
                return self
            return self.t.node("toint" if self.kind == FLOAT else "add",
                               (self.i,) if self.kind == FLOAT else (self.i, self.t.lift(0, "astype").i), INT)
        if k == "f":
            return self if self.kind == FLOAT else self.t.node("cast", (self.i,), FLOAT)
        if k == "b":
            return self if self.kind == BOOL else self._bin("ne", 0)
        raise ScoreModTraceError(f"score_mod casts a traced value to {np.dtype(dtype)}")

    def __bool__(self) -> bool:
        raise ScoreModTraceError("score_mod branches on a traced value (Python if / and / or / not, or a "
                                 "chained comparison): write it with np.where(cond, a, b), &, |, ~")

    def __index__(self) -> int:
        raise ScoreModTraceError("score_mod uses a traced value as a Python index (indexing a list, range, or "
                                 "an array the tracer did not see): capture NumPy arrays as variables of "
                                 "the function (closure, global or default argument) and index those")

    __int__ = __index__

    def __float__(self) -> float:
        raise ScoreModTraceError("score_mod converts a traced value to a Python float (float(), math.*): "
                                 "use NumPy's functions (np.exp, np.tanh, ...) on it instead")

    def __array__(self, *a: Any, **k: Any) -> Any:
        raise ScoreModTraceError("score_mod turns a traced value into an array (np.asarray, or an operation "
                                 "the tracer does not know): the traced operations are arithmetic, "
                                 "comparisons, & | ~, np.exp/log/tanh/sqrt/abs/minimum/maximum/where/clip")

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        op = _UFUNCS.get(ufunc)
        if method != "__call__" or op is None or kwargs:
            raise ScoreModTraceError(f"score_mod calls np.{getattr(ufunc, '__name__', ufunc)}"
                                     f"{'.' + method if method != '__call__' else ''}, which the tracer does not "
                                     f"know (traced: arithmetic, comparisons, exp, log, tanh, sqrt, floor, "
                                     f"abs, minimum, maximum, where, clip, .astype)")
        t = next(x.t for x in inputs if isinstance(x, Sym))
        args = [t.lift(x, f"np.{ufunc.__name__}") for x in inputs]
        if len(args) == 1:
            return args[0]._un(op)
        return args[0]._bin(op, args[1])

    @classmethod
    def __torch_function__(cls, func: Any, types_: Any, args: Any = (), kwargs: Any = None) -> Any:
        """torch's functions and Tensor methods on traced values (a score_mod written for torch's
        flex_attention): the same operations as NumPy's."""
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        if name in _TORCH_UNARY and len(args) == 1 and not kwargs:
            return getattr(np, _TORCH_UNARY[name])(args[0])
        if name in _TORCH_BINARY and len(args) == 2 and not kwargs:
            return getattr(np, _TORCH_BINARY[name])(args[0], args[1])
        if name == "where" and len(args) == 3 and not kwargs:
            return np.where(*args)
        if name in ("clamp", "clip") and len(args) >= 1:
            lo = kwargs.get("min", args[1] if len(args) > 1 else None)
            hi = kwargs.get("max", args[2] if len(args) > 2 else None)
            x = args[0]
            if lo is not None:
                x = np.maximum(x, lo)
            return x if hi is None else np.minimum(x, hi)
        raise ScoreModTraceError(f"score_mod calls torch's {name}, which the tracer does not know (traced: "
                                 f"arithmetic, comparisons, where, clamp, exp, log, tanh, sqrt, abs, floor, "
                                 f"minimum, maximum)")

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        t = next(x.t for x in list(args) + list(kwargs.values()) if isinstance(x, Sym))
        if func is np.where and len(args) == 3 and not kwargs:
            c, a, b = (t.lift(x, "np.where") for x in args)
            if c.kind != BOOL:
                c = c._bin("ne", 0)
            kind = FLOAT if FLOAT in (a.kind, b.kind) else INT
            return t.node("where", (c.i, a.i, b.i), kind)
        if func is np.clip and not kwargs and len(args) == 3:
            x, lo, hi = args
            return np.minimum(np.maximum(x, lo), hi)
        raise ScoreModTraceError(f"score_mod calls np.{getattr(func, '__name__', func)}, which the tracer does not "
                                 f"know (traced: np.where, np.clip and the ufuncs exp, log, tanh, sqrt, abs, "
                                 f"minimum, maximum, arithmetic and comparisons)")


_TORCH_UNARY = {"exp": "exp", "log": "log", "tanh": "tanh", "sqrt": "sqrt", "abs": "abs", "absolute": "abs",
                "floor": "floor", "neg": "negative", "negative": "negative", "logical_not": "logical_not"}
_TORCH_BINARY = {"minimum": "minimum", "maximum": "maximum", "min": "minimum", "max": "maximum",
                 "add": "add", "sub": "subtract", "mul": "multiply", "div": "true_divide", "pow": "power",
                 "remainder": "remainder", "floor_divide": "floor_divide", "logical_and": "logical_and",
                 "logical_or": "logical_or", "lt": "less", "le": "less_equal", "gt": "greater",
                 "ge": "greater_equal", "eq": "equal", "ne": "not_equal"}


class _ArrayProxy:
    """A captured NumPy array (or torch tensor, read as NumPy: source is the tensor) during
    tracing: indexing it with traced values records a load."""

    def __init__(self, t: _Tracer, arr: np.ndarray, source: Any = None) -> None:
        self.t, self.arr = t, arr
        self.source = arr if source is None else source
        self.id: Optional[int] = None
        self.shape, self.ndim, self.dtype = arr.shape, arr.ndim, arr.dtype

    def __getitem__(self, idx: Any) -> Any:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not any(isinstance(i, Sym) for i in idx):
            return self.arr[tuple(idx)]
        if len(idx) != self.arr.ndim:
            raise ScoreModTraceError(f"score_mod indexes a captured array of shape {self.arr.shape} with "
                                     f"{len(idx)} indices: give one index per axis (no slices)")
        nodes = []
        for i in idx:
            s = self.t.lift(i, "an array index")
            if s.kind == FLOAT:
                raise ScoreModTraceError("score_mod indexes an array with a float value: use // for integer "
                                         "division")
            nodes.append(s.i)
        if self.arr.dtype.kind not in "fiub":
            raise ScoreModTraceError(f"score_mod reads a captured array of dtype {self.arr.dtype}")
        if self.id is None:
            self.t.arrays.append(self.arr)
            self.t.sources.append(self.source)
            self.id = len(self.t.arrays) - 1
        kind = FLOAT if self.arr.dtype.kind == "f" else (BOOL if self.arr.dtype.kind == "b" else INT)
        return self.t.node("load", (self.id,) + tuple(nodes), kind)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.arr, name)


def _with_proxies(fn: Callable[..., Any], t: _Tracer) -> Callable[..., Any]:
    """fn with the NumPy arrays it captures (closure cells, the globals it names, defaults)
    replaced by proxies."""
    if not isinstance(fn, types.FunctionType):
        return fn
    proxies: Dict[int, _ArrayProxy] = {}

    def sub(x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.ndim > 0:
            if id(x) not in proxies:
                proxies[id(x)] = _ArrayProxy(t, x)
            return proxies[id(x)]
        if _is_torch_tensor(x) and x.ndim > 0:           # read as NumPy; its gradient through selfattn.torch
            if id(x) not in proxies:
                proxies[id(x)] = _ArrayProxy(t, x.detach().cpu().numpy(), x)
            return proxies[id(x)]
        return x

    code = fn.__code__
    g = dict(fn.__globals__)
    for name in code.co_names:
        if name in g:
            g[name] = sub(g[name])
    closure = None
    if fn.__closure__:
        closure = tuple(types.CellType(sub(c.cell_contents)) if _cell_full(c) else c for c in fn.__closure__)
    defaults = tuple(sub(d) for d in fn.__defaults__) if fn.__defaults__ else fn.__defaults__
    new = types.FunctionType(code, g, fn.__name__, defaults, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach") and hasattr(x, "ndim")


def _cell_full(c: Any) -> bool:
    try:
        c.cell_contents
    except ValueError:
        return False
    return True


def trace(score_mod: Callable[..., Any]) -> Program:
    """The program of ``score_mod(score, b, h, q_idx, kv_idx)`` (see the module docstring)."""
    if not callable(score_mod):
        raise TypeError(f"score_mod must be callable (score, b, h, q_idx, kv_idx) -> score, got "
                        f"{type(score_mod).__name__}")
    t = _Tracer()
    args = [t.node("in", (k,), FLOAT if k == 0 else INT) for k in range(5)]
    fn = _with_proxies(score_mod, t)
    try:
        r = fn(*args)
    except ScoreModTraceError:
        raise
    except Exception as exc:
        raise ScoreModTraceError(f"score_mod raised {type(exc).__name__} while being traced: {exc}") from exc
    out = t.lift(r, "its result")
    if out.kind != FLOAT:
        out = t.node("cast", (out.i,), FLOAT)
    prog = Program(t.nodes, out.i, t.arrays)
    prog.sources = t.sources
    return prog


# ---------------------------------------------------------------------------------------------
class Lowered:
    """A program as the kernels take it (score_mod.h): typed C nodes (``_core.SCORE_MOD_NODE``)
    in evaluation order, the forward's first (``n_fwd`` of them; ``out`` its result), then
    d out / d score (``dout``); ``arrays`` float64 or int64, C order."""

    def __init__(self, nodes: np.ndarray, n_fwd: int, out: int, dout: int, arrays: List[np.ndarray],
                 program: Optional[Program] = None) -> None:
        self.nodes, self.n_fwd, self.out, self.dout, self.arrays = nodes, n_fwd, out, dout, arrays
        self.program = program                     # what it was lowered from (array gradients)

    def __repr__(self) -> str:
        return f"Lowered({len(self.nodes)} nodes, n_fwd={self.n_fwd}, out={self.out}, dout={self.dout})"


_F_BIN = {"add": "fadd", "sub": "fsub", "mul": "fmul", "div": "fdiv", "pow": "fpow", "min": "fmin",
          "max": "fmax", "floordiv": "ffloordiv", "mod": "fmod"}
_I_BIN = {"add": "iadd", "sub": "isub", "mul": "imul", "pow": "ipow", "min": "imin", "max": "imax",
          "floordiv": "ifloordiv", "mod": "imod"}
_F_UN = {"neg": "fneg", "abs": "fabs", "exp": "fexp", "log": "flog", "tanh": "ftanh", "sqrt": "fsqrt",
         "floor": "ffloor"}


def _strided_loads(nodes: List[Tuple[str, tuple, str]]) -> Dict[int, Tuple[int, List[Any], int]]:
    """The loads whose indices are affine in kv_idx on one axis, the rest constant along a row
    (T5's ``bias[h, q_idx - kv_idx + c]``): load node -> (axis, each axis's row part, kv's
    coefficient c). The kernels then read them strided, computing no index per key."""
    varies = []                                    # depends on the score or kv_idx
    for op, args, kind in nodes:
        if op == "in":
            varies.append(args[0] in (0, 4))
        elif op == "const":
            varies.append(False)
        elif op == "load":
            varies.append(any(varies[j] for j in args[1:]))
        else:
            varies.append(any(varies[j] for j in args))

    def affine(i: int) -> Optional[Tuple[int, Any]]:   # (c, row part) with node i = row part + c kv
        op, args, kind = nodes[i]
        if kind == FLOAT:
            return None
        if not varies[i]:
            return 0, ("node", i)
        if op == "in" and args[0] == 4:
            return 1, None
        if op in ("add", "sub"):
            a, b = affine(args[0]), affine(args[1])
            if a is None or b is None:
                return None
            c = a[0] + b[0] if op == "add" else a[0] - b[0]
            if b[1] is None:
                return c, a[1]
            if a[1] is None:
                return c, b[1] if op == "add" else ("neg", b[1])
            return c, (op, a[1], b[1])
        if op == "neg":
            a = affine(args[0])
            return None if a is None else (-a[0], None if a[1] is None else ("neg", a[1]))
        if op == "mul":
            for x, y in ((args[0], args[1]), (args[1], args[0])):
                if nodes[y][0] == "const" and nodes[y][2] != FLOAT:
                    a, k = affine(x), int(nodes[y][1][0])
                    if a is not None:
                        return a[0] * k, None if a[1] is None else ("mul", a[1], k)
        return None

    plans = {}
    for i, (op, args, kind) in enumerate(nodes):
        if op != "load" or not varies[i]:
            continue
        found = [affine(j) for j in args[1:]]
        forms = [fm for fm in found if fm is not None]
        if len(forms) != len(found):
            continue                               # an index not affine in kv_idx: per key
        moving = [d for d, fm in enumerate(forms) if fm[0] != 0]
        if len(moving) == 1 and abs(forms[moving[0]][0]) < 2 ** 31:
            plans[i] = (moving[0], [fm[1] for fm in forms], forms[moving[0]][0])
    return plans


def _rest_leaves(rests: List[Any]) -> List[int]:
    out: List[int] = []
    todo = list(rests)
    while todo:
        r = todo.pop()
        if r is None or r[0] == "const":
            continue
        if r[0] == "node":
            out.append(r[1])
        else:
            todo.extend(x for x in r[1:] if isinstance(x, tuple) or x is None)
    return out


def lower(prog: Program) -> Lowered:
    """The kernels' form of a traced program and its derivative with respect to the score."""
    from selfattn import _core
    ops = _core.SCORE_MOD_OPS
    g = prog.grad_score()                          # prog's nodes, then the tangent's
    n_prog = len(prog.nodes)
    plans = _strided_loads(g.nodes)
    # live nodes: what out and dout read (a strided load: its row parts only)
    live = [False] * len(g.nodes)
    stack = [prog.out, g.out]
    while stack:
        i = stack.pop()
        if live[i]:
            continue
        live[i] = True
        op, args, _ = g.nodes[i]
        if op == "load" and i in plans:
            stack.extend(_rest_leaves(plans[i][1]))
        elif op == "load":
            stack.extend(args[1:])
        elif op not in ("in", "const"):
            stack.extend(args)
    rows: List[Tuple[int, Tuple[int, ...], int, int, float, int]] = []
    kinds: List[str] = []                          # of each emitted node: FLOAT or INT (bools as 0 / 1)
    new: Dict[int, int] = {}
    memo: Dict[Tuple[str, int], int] = {}

    def emit(name: str, args: Sequence[int] = (), kind: str = FLOAT, arr: int = 0, f: float = 0.0, i: int = 0,
             kv_axis: int = -1) -> int:
        a = list(args) + [0] * (4 - len(args))
        rows.append((ops[name], tuple(a), arr, kv_axis, f, i))
        kinds.append(kind)
        return len(rows) - 1

    def emit_rest(r: Any) -> int:                  # a row part of a strided load's index (int)
        if r is None:
            r = ("const", 0)
        if r[0] == "node":
            return as_int(new[r[1]])
        if r not in memo_rest:
            if r[0] == "const":
                memo_rest[r] = emit("iconst", (), INT, i=r[1])
            elif r[0] == "neg":
                memo_rest[r] = emit("ineg", (emit_rest(r[1]),), INT)
            elif r[0] == "mul":
                memo_rest[r] = emit("imul", (emit_rest(r[1]), emit_rest(("const", r[2]))), INT)
            else:
                memo_rest[r] = emit("i" + r[0], (emit_rest(r[1]), emit_rest(r[2])), INT)
        return memo_rest[r]
    memo_rest: Dict[Any, int] = {}

    def as_float(j: int) -> int:
        if kinds[j] == FLOAT:
            return j
        if ("f", j) not in memo:
            memo[("f", j)] = emit("fcast", (j,))
        return memo[("f", j)]

    def as_int(j: int) -> int:
        if kinds[j] != FLOAT:
            return j
        if ("i", j) not in memo:
            memo[("i", j)] = emit("itrunc", (j,), INT)
        return memo[("i", j)]

    arrays: List[np.ndarray] = []
    for t in prog.arrays:
        if t.ndim > 4:
            raise ScoreModTraceError(f"score_mod reads a captured array of {t.ndim} dims; the kernels take up to 4")
        arrays.append(np.ascontiguousarray(t, dtype=np.float64 if t.dtype.kind == "f" else np.int64))
    n_fwd = 0
    for idx, (op, args, kind) in enumerate(g.nodes):
        if idx == n_prog:
            n_fwd = len(rows)
        if not live[idx]:
            continue
        m = [new[j] for j in args] if op not in ("in", "const", "load") else []
        if op == "in":
            r = emit(("score", "b", "h", "q", "kv")[args[0]], (), FLOAT if args[0] == 0 else INT)
            if kind == FLOAT:
                r = as_float(r)
            elif args[0] == 0:
                r = as_int(r)
        elif op == "const":
            r = (emit("fconst", (), FLOAT, f=float(args[0])) if kind == FLOAT
                 else emit("iconst", (), INT, i=int(args[0])))
        elif op == "load" and idx in plans:        # strided along the row: kv's coefficient c on axis
            axis, rests, c = plans[idx]
            r = emit("fload" if kind == FLOAT else "iload", [emit_rest(x) for x in rests],
                     FLOAT if kind == FLOAT else INT, arr=args[0], i=c, kv_axis=axis)
        elif op == "load":
            r = emit("fload" if kind == FLOAT else "iload", [as_int(new[j]) for j in args[1:]],
                     FLOAT if kind == FLOAT else INT, arr=args[0])
        elif op in _COMPARE:
            if FLOAT in (kinds[m[0]], kinds[m[1]]):
                r = emit("f" + op, (as_float(m[0]), as_float(m[1])), INT)
            else:
                r = emit("i" + op, (m[0], m[1]), INT)
        elif op in _LOGIC:
            r = emit(op, (as_int(m[0]), as_int(m[1])), INT)
        elif op == "not":
            r = emit("not", (as_int(m[0]),), INT)
        elif op == "where":
            c = as_int(m[0])
            r = (emit("fwhere", (c, as_float(m[1]), as_float(m[2]))) if kind == FLOAT
                 else emit("iwhere", (c, m[1], m[2]), INT))
        elif op == "cast":
            r = as_float(m[0])
        elif op == "toint":
            r = as_int(m[0])
        elif op in _F_UN and kind == FLOAT:
            r = emit(_F_UN[op], (as_float(m[0]),))
        elif op in ("neg", "abs"):
            r = emit("i" + op, (m[0],), INT)
        elif op in _F_BIN and kind == FLOAT:
            r = emit(_F_BIN[op], (as_float(m[0]), as_float(m[1])))
        elif op in _I_BIN:
            r = emit(_I_BIN[op], (m[0], m[1]), INT)
        else:                                      # pragma: no cover (the tracer records no other)
            raise ScoreModTraceError(f"no kernel form for {op} ({kind})")
        new[idx] = r
    if n_prog == len(g.nodes):
        n_fwd = len(rows)
    out, dout = as_float(new[prog.out]), as_float(new[g.out])
    if out >= n_fwd:                               # a cast emitted after the forward's nodes
        n_fwd = len(rows)
    nodes = np.zeros(len(rows), dtype=_core.SCORE_MOD_NODE)
    for ti, row in enumerate(rows):
        nodes[ti] = row
    return Lowered(nodes, max(n_fwd, out + 1), out, dout, arrays, prog)


# ---------------------------------------------------------------------------------------------
def array_grads(prog: Program, wanted: Sequence[int], q: np.ndarray, k: np.ndarray, v: np.ndarray,
                out: np.ndarray, lse: np.ndarray, dout: np.ndarray, scale: float,
                mask_mod: Optional[Callable[..., Any]] = None, block_bytes: int = 1 << 25) -> List[np.ndarray]:
    """Gradients of sum(out * dout) with respect to the captured arrays ``prog.arrays[t]`` for t
    in `wanted` (float64, their shapes), blockwise in NumPy: for a block of query rows of every
    (batch, head) at once, P is recomputed from lse (the forward's), dS = P (dO V^T - D), and
    each load of array t adds dS times d score_mod / d (the loaded value) at its index
    (np.bincount: a fixed order, the same bits every time). q (B, Hq, L, E); k, v (B, Hq, S, .)
    already expanded to the query heads; mask_mod: the block mask's mod, or None. Memory: about
    block_bytes per float64 value of the program; time: that of a dense float64 backward."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    grads = {t: np.zeros(prog.arrays[t].size) for t in wanted}
    loads = [i for i in prog.loads() if prog.nodes[i][1][0] in grads]
    dprogs = {i: prog.grad_load(i) for i in loads}
    D = np.einsum("bhle,bhle->bhl", dout, out)
    rows = max(1, min(L, block_bytes // max(1, 8 * B * Hq * S)))
    bi = np.arange(B).reshape(B, 1, 1, 1)
    hi = np.arange(Hq).reshape(1, Hq, 1, 1)
    ki = np.arange(S).reshape(1, 1, 1, S)
    with np.errstate(all="ignore"):
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            qi = np.arange(r0, r1).reshape(1, 1, -1, 1)
            raw = scale * (q[:, :, r0:r1] @ np.swapaxes(k, -1, -2))
            inputs = (raw, bi, hi, qi, ki)
            vals = prog._values(inputs)
            y = np.broadcast_to(vals[prog.out], raw.shape)
            live = np.isfinite(lse[:, :, r0:r1, None])
            if mask_mod is not None:
                live = live & np.broadcast_to(np.asarray(mask_mod(bi, hi, qi, ki), dtype=bool), raw.shape)
            P = np.where(live, np.exp(y - np.where(live, lse[:, :, r0:r1, None], 0.0)), 0.0)
            dS = P * (dout[:, :, r0:r1] @ np.swapaxes(v, -1, -2) - D[:, :, r0:r1, None])
            for i in loads:
                t = prog.nodes[i][1][0]
                arr = prog.arrays[t]
                g = np.broadcast_to(dprogs[i].evaluate(*inputs), raw.shape)
                contrib = np.where(P > 0, dS * g, 0.0)
                idx = []
                for d, j in enumerate(prog.nodes[i][1][1:]):
                    x = np.asarray(vals[j], dtype=np.int64)
                    idx.append(np.broadcast_to(np.where(x < 0, x + arr.shape[d], x), raw.shape))
                flat = np.ravel_multi_index(tuple(idx), arr.shape, mode="clip")   # outside: masked, 0 added
                grads[t] += np.bincount(flat.ravel(), weights=contrib.ravel(), minlength=arr.size)
    return [grads[t].reshape(prog.arrays[t].shape) for t in wanted]


_ = builtins  # (kept: builtins' abs/min/max on Syms go through __abs__ or raise in __bool__)
